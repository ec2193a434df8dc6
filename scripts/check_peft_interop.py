#!/usr/bin/env python3
"""Proof of interoperability: an adapter trained by qlora loads with PEFT onto the same base model in
transformers and reproduces qlora's evaluation loss.

Runs the built binary (build/qlora) to convert tests/fixtures/model/llama/hf (a small Llama
checkpoint, vocab 300, so byte-level tokens are valid ids), train LoRA on the bundled Austen excerpt,
and evaluate on held-out text; then evaluates the same windows in Python with transformers + PEFT.
Done for unquantized (--quant-type none) and NF4 (the Python side replaces every decoder linear by
its bitsandbytes NF4 round trip, which is what qlora computes with), each with LoRA and with DoRA
(--use-dora; PEFT reads use_dora and the magnitude vectors from the adapter folder).

Needs: pip install torch transformers peft bitsandbytes. Writes bench/results/peft_interop.json.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import bitsandbytes.functional as bnb_functional
import peft
import torch
import transformers
from peft import PeftModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
QLORA = os.path.join(ROOT, "build", "qlora")
BASE = os.path.join(ROOT, "tests", "fixtures", "model", "llama", "hf")
TRAIN_TEXT = os.path.join(ROOT, "launcher", "demo", "austen_excerpt.txt")
EVAL_TEXT = os.path.join(ROOT, "..", "shared", "data", "austen", "persuasion.txt")
SEQ_LEN, WINDOWS = 64, 16
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora(*arguments):
    completed = subprocess.run([QLORA, *arguments], check=True, capture_output=True, text=True)
    return completed.stdout


def python_loss(adapter_dir, eval_path, nf4):
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    if nf4:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.split(".")[-1] in PROJECTIONS:
                    packed, state = bnb_functional.quantize_4bit(module.weight.contiguous(), blocksize=64,
                                                                 quant_type="nf4", compress_statistics=False)
                    module.weight.copy_(bnb_functional.dequantize_4bit(packed, state).float())
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    tokens = torch.tensor(list(open(eval_path, "rb").read()), dtype=torch.int64)
    windows = torch.stack([tokens[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1] for i in range(WINDOWS)])
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return loss.item()


def byte_token_files(folder, texts):
    """The fixture checkpoint has no tokenizer file, so qlora trains and evaluates on pre-tokenized data:
    byte tokens (id = byte value, what the Python side feeds), written by qlora itself as the token
    cache of a synthetic byte-token model reading a copy of each text."""
    store = os.path.join(folder, "bytes.h5")
    qlora("convert", "--synthetic", "micro", "--out", store)
    token_files = []
    for index, text in enumerate(texts):
        copy = os.path.join(folder, f"text{index}.txt")
        shutil.copyfile(text, copy)
        qlora("eval", "--model", store, "--data", copy, "--seq-len", str(SEQ_LEN), "--windows", "1")
        token_files.append(copy + ".tokens.h5")
        assert os.path.exists(token_files[-1])
    return token_files


def main():
    eval_path = EVAL_TEXT if os.path.exists(EVAL_TEXT) else TRAIN_TEXT
    results = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
               "eval_text": os.path.basename(eval_path), "windows": WINDOWS, "seq_len": SEQ_LEN, "cases": []}
    with tempfile.TemporaryDirectory() as folder:
        train_tokens, eval_tokens = byte_token_files(folder, [TRAIN_TEXT, eval_path])
        for quant_type, dora in [("none", False), ("nf4", False), ("none", True), ("nf4", True)]:
            store = os.path.join(folder, f"{quant_type}.h5")
            run = os.path.join(folder, f"run-{quant_type}-{'dora' if dora else 'lora'}")
            if not os.path.exists(store):
                qlora("convert", "--from", BASE, "--quant-type", quant_type, "--out", store)
            qlora("train", "--model", store, "--data", train_tokens, "--steps", "30", "--seq-len", str(SEQ_LEN),
                  "--global-batch", "8", "--eval-fraction", "0", "--lora-r", "8", "--lora-alpha", "16",
                  "--progress", "lines", "--out", run, *(["--use-dora"] if dora else []))
            with open(os.path.join(run, "final", "adapter_config.json")) as config_file:
                assert json.load(config_file)["use_dora"] == dora
            output = qlora("eval", "--model", store, "--adapter", os.path.join(run, "final"), "--data", eval_tokens,
                           "--seq-len", str(SEQ_LEN), "--windows", str(WINDOWS))
            qlora_loss = float(re.search(r"eval: loss ([0-9.]+)", output).group(1))
            base_output = qlora("eval", "--model", store, "--data", eval_tokens, "--seq-len", str(SEQ_LEN),
                                "--windows", str(WINDOWS))
            base_loss = float(re.search(r"eval: loss ([0-9.]+)", base_output).group(1))
            peft_loss = python_loss(os.path.join(run, "final"), eval_path, quant_type == "nf4")
            case = {"quant_type": quant_type, "use_dora": dora, "qlora_eval_loss": qlora_loss, "peft_eval_loss": peft_loss,
                    "base_eval_loss_without_adapter": base_loss,
                    "relative_difference": abs(qlora_loss - peft_loss) / peft_loss}
            results["cases"].append(case)
            print(json.dumps(case))
    path = os.path.join(ROOT, "bench", "results", "peft_interop.json")
    with open(path, "w") as out:
        json.dump(results, out, indent=2)
        out.write("\n")
    worst = max(case["relative_difference"] for case in results["cases"])
    print(f"worst relative difference {worst:.2e}; wrote {path}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
