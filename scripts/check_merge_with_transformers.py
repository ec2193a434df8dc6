#!/usr/bin/env python3
"""Checks `qlora merge` output with the reference readers (transformers, the gguf package).

For each model: convert to a 4-bit store with `qlora convert`, write a seeded PEFT adapter (r 8,
alpha 16, all seven projections, non-zero B), then
  1. `qlora merge --dtype fp32` -> Hugging Face folder; transformers loads it
     (AutoModelForCausalLM, output_loading_info) with no missing / unexpected / mismatched keys;
  2. `qlora eval --model STORE --adapter ADAPTER` (the unmerged adapter on the 4-bit model) against
     the mean next-token loss transformers computes on the merged folder over the same windows
     (qlora eval's layout: windows of seq-len + 1 tokens sharing one token, text tokens + eos);
     the two must agree within 1e-4 relative;
  3. `qlora merge --format gguf` (F16 and Q8_0): gguf.GGUFReader reads every tensor back; after
     undoing llama.cpp's Q/K row order F16 equals the fp32 merge cast to fp16, and the Q8_0 bytes
     equal gguf.quants.quantize of the merged fp32 weights; transformers' GGUF loader
     (from_pretrained(..., gguf_file=)) loads the F16 file and its loss agrees with the folder's
     within 1e-3 relative (fp16 weights);
  4. when the folder has a tokenizer.json (SmolLM2: written from the GGUF's tokenizer metadata),
     transformers' AutoTokenizer on the folder gives the source tokenizer's ids for the text.
Models: synthetic `tiny` (hidden 256, byte tokens) and, with --smollm2, SmolLM2-135M-Instruct
(its GGUF converted by qlora, tokenized for transformers from the same GGUF with SmolLM2's
        Digits-then-ByteLevel pre-tokenizer).

Needs: torch, transformers, gguf, safetensors, numpy (e.g. /work/fixvenv). Run from the repo root:
  /work/fixvenv/bin/python scripts/check_merge_with_transformers.py --qlora build/qlora \
      [--smollm2 /path/SmolLM2-135M-Instruct.Q4_1.gguf] [--out bench/results/merge_transformers.json]
"""
import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SEQ_LEN = 64
WINDOWS = 8


def run(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def write_adapter(folder, weights, config, seed):
    """A PEFT LoRA adapter (r 8, alpha 16) on all projections with seeded non-zero A and B."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for projection in PROJECTIONS:
            module = f"model.layers.{layer}.{projection}"
            out_features, in_features = weights[module + ".weight"].shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, in_features, generator=generator) * 0.05
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, 8, generator=generator) * 0.05
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as handle:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                   "target_modules": [p.split(".")[1] for p in PROJECTIONS], "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, handle)


def windows_loss(model, ids):
    """qlora eval's mean next-token loss over the first WINDOWS windows of SEQ_LEN + 1 tokens."""
    count = min(WINDOWS, (len(ids) - 1) // SEQ_LEN)
    ids = torch.tensor(ids, dtype=torch.long)
    inputs = torch.stack([ids[w * SEQ_LEN: w * SEQ_LEN + SEQ_LEN] for w in range(count)])
    targets = torch.stack([ids[w * SEQ_LEN + 1: w * SEQ_LEN + SEQ_LEN + 1] for w in range(count)])
    with torch.no_grad():
        logits = model(inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item(), count


def llama_permute(weights, heads):
    """llama.cpp's converter row order for Q and K (LlamaModel.permute)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def check_gguf(qlora, store, adapter, work, merged, config):
    gguf_to_hf = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    block_names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}
    results = {}
    for gguf_type in ("f16", "q8_0"):
        path = os.path.join(work, f"merged_{gguf_type}.gguf")
        run([qlora, "merge", "--model", store, "--adapter", adapter, "--out", path, "--format", "gguf",
             "--gguf-type", gguf_type])
        reader = gguf.GGUFReader(path)
        worst, tensors, exact_q8 = 0.0, 0, 0
        for tensor in reader.tensors:
            name = tensor.name[:-len(".weight")]
            if name == "rope_freqs":
                continue
            if name.startswith("blk."):
                _, layer, part = name.split(".")
                hf = f"model.layers.{layer}.{block_names[part]}.weight"
            else:
                hf = gguf_to_hf[name] + ".weight"
            expected = merged[hf].float().numpy()
            if ".q_proj" in hf:
                expected = llama_permute(expected, config["num_attention_heads"])
            elif ".k_proj" in hf:
                expected = llama_permute(expected, config["num_key_value_heads"])
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
            kind = tensor.tensor_type
            if kind == gguf.GGMLQuantizationType.F32:
                assert np.array_equal(values, expected), hf
            elif kind == gguf.GGMLQuantizationType.F16:
                assert np.array_equal(values, expected.astype(np.float16).astype(np.float32)), hf
            else:
                assert kind == gguf.GGMLQuantizationType.Q8_0, kind
                reference = gguf.quants.quantize(np.ascontiguousarray(expected), kind)
                assert np.array_equal(np.asarray(tensor.data).reshape(-1), reference.reshape(-1)), hf
                exact_q8 += 1
            worst = max(worst, float(np.max(np.abs(values - expected))))
            tensors += 1
        results[gguf_type] = {"tensors": tensors, "max_abs_error": worst, "q8_0_tensors_equal_gguf_quantize": exact_q8}
        print(f"  gguf {gguf_type}: GGUFReader read {tensors} tensors; max |gguf - fp32 merge| = {worst:.3e}"
              + (f"; {exact_q8} Q8_0 tensors byte-equal to gguf.quants.quantize" if exact_q8 else ""))
    return results


def check_model(label, qlora, store, work, text, tokenize, seed):
    base = os.path.join(work, "base_hf")
    run([qlora, "merge", "--model", store, "--out", base, "--dtype", "fp32"])
    config = json.load(open(os.path.join(base, "config.json")))
    base_weights = load_file(os.path.join(base, "model.safetensors"))
    adapter = os.path.join(work, "adapter")
    write_adapter(adapter, base_weights, config, seed)
    merged_dir = os.path.join(work, "merged_hf")
    merge_line = run([qlora, "merge", "--model", store, "--adapter", adapter, "--out", merged_dir, "--dtype", "fp32"])
    print("  " + merge_line.strip().splitlines()[0])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True,
                                                                    torch_dtype=torch.float32)
    model.eval()
    problems = {key: value for key, value in info.items() if value}
    assert not problems, problems
    data = os.path.join(work, "eval.txt")
    with open(data, "w") as handle:
        handle.write(text)
    eval_line = run([qlora, "eval", "--model", store, "--adapter", adapter, "--data", data,
                     "--seq-len", str(SEQ_LEN), "--windows", str(WINDOWS)])
    qlora_loss = float(re.search(r"eval: loss ([0-9.]+)", eval_line).group(1))
    base_loss_line = run([qlora, "eval", "--model", store, "--data", data, "--seq-len", str(SEQ_LEN),
                          "--windows", str(WINDOWS)])
    base_loss = float(re.search(r"eval: loss ([0-9.]+)", base_loss_line).group(1))
    ids = tokenize(text)
    hf_loss, windows = windows_loss(model, ids)
    relative = abs(hf_loss - qlora_loss) / abs(qlora_loss)
    print(f"  transformers on the merged folder: loss {hf_loss:.6f} over {windows} x {SEQ_LEN} tokens; "
          f"qlora eval, unmerged adapter: {qlora_loss:.6f} (relative difference {relative:.2e}); "
          f"without the adapter: {base_loss:.6f}")
    assert relative <= 1e-4, relative
    tokenizer_result = None
    if os.path.exists(os.path.join(merged_dir, "tokenizer.json")):
        # The folder's own tokenizer (qlora wrote tokenizer.json from the GGUF metadata) must give the
        # ids the source tokenizer gives.
        folder_tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
        folder_ids = folder_tokenizer(text, add_special_tokens=False).input_ids + [folder_tokenizer.eos_token_id]
        assert folder_ids == ids, "the merged folder's tokenizer.json tokenizes differently"
        tokenizer_result = {"tokens": len(ids), "equal_ids": True, "eos": folder_tokenizer.eos_token,
                            "bos": folder_tokenizer.bos_token}
        print(f"  the folder's tokenizer.json gives the source tokenizer's {len(ids)} ids "
              f"(bos {folder_tokenizer.bos_token!r}, eos {folder_tokenizer.eos_token!r})")
    merged = load_file(os.path.join(merged_dir, "model.safetensors"))
    gguf_results = check_gguf(qlora, store, adapter, work, merged, config)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(work, gguf_file="merged_f16.gguf",
                                                                   torch_dtype=torch.float32)
    gguf_model.eval()
    gguf_loss, _ = windows_loss(gguf_model, ids)
    gguf_relative = abs(gguf_loss - hf_loss) / abs(hf_loss)
    print(f"  transformers' GGUF loader on the F16 file: loss {gguf_loss:.6f} (relative to the folder {gguf_relative:.2e})")
    assert gguf_relative <= 1e-3, gguf_relative
    return {"model": label, "transformers_missing_unexpected_mismatched": 0, "seq_len": SEQ_LEN, "windows": windows,
            "qlora_eval_unmerged_loss": qlora_loss, "transformers_merged_loss": hf_loss, "relative_difference": relative,
            "base_loss_without_adapter": base_loss, "gguf": gguf_results, "transformers_gguf_f16_loss": gguf_loss,
            "transformers_gguf_f16_relative": gguf_relative, "folder_tokenizer": tokenizer_result}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--qlora", default="build/qlora")
    parser.add_argument("--smollm2")
    parser.add_argument("--out", default="bench/results/merge_transformers.json")
    args = parser.parse_args()
    qlora = os.path.abspath(args.qlora)
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "README.md"), encoding="utf-8").read()[:6000]
    results = []
    with tempfile.TemporaryDirectory() as work:
        print("synthetic tiny (hidden 256, 4 layers, byte tokens):")
        tiny = os.path.join(work, "tiny")
        os.makedirs(tiny)
        store = os.path.join(tiny, "tiny.h5")
        run([qlora, "convert", "--synthetic", "tiny", "--out", store, "--double-quant"])
        results.append(check_model("synthetic tiny (nf4, double quantization)", qlora, store, tiny, text,
                                   lambda t: list(t.encode("utf-8")), 1))
        if args.smollm2:
            print("SmolLM2-135M-Instruct (from its Q4_1 GGUF):")
            smol = os.path.join(work, "smollm2")
            os.makedirs(smol)
            store = os.path.join(smol, "smollm2.h5")
            run([qlora, "convert", "--from", args.smollm2, "--out", store])
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(args.smollm2),
                                                                   gguf_file=os.path.basename(args.smollm2))
            # transformers' GGUF loader drops the Digits step of SmolLM2's pre-tokenizer (GGUF "smollm");
            # SmolLM2's own tokenizer.json, llama.cpp and qlora split digits first (as
            # scripts/make_tokenizer_fixtures.py records), so the reference puts it back.
            from tokenizers import pre_tokenizers
            tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
            results.append(check_model("SmolLM2-135M-Instruct (nf4)", qlora, store, smol, text,
                                       lambda t: tokenizer(t, add_special_tokens=False).input_ids
                                       + [tokenizer.eos_token_id], 2))
    versions = {package: importlib.metadata.version(package) for package in ("torch", "transformers", "gguf", "numpy")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"results": results, "versions": versions}, handle, indent=2)
    print(f"all checks passed; wrote {args.out}")


if __name__ == "__main__":
    main()
