#!/usr/bin/env python3
"""Pre-quantized bitsandbytes checkpoints for the importer tests (tests/shard/test_bnb_import.cpp).

A tiny random Llama (2 layers, hidden 128) is saved once in bf16 (`source/`), then loaded back
through transformers with BitsAndBytesConfig and saved with save_pretrained, exactly as users make
pre-quantized checkpoints:
  nf4_double_quant/  load_in_4bit, nf4, bnb_4bit_use_double_quant=True   (absmax as uint8 + nested)
  nf4/               load_in_4bit, nf4, no double quantization
  fp4/               load_in_4bit, fp4, no double quantization          (quant_state...__fp4 entries)
  int8/              load_in_8bit                                        (weight int8 + SCB + weight_format)
bitsandbytes 0.50 quantizes on the CPU here (its pure-torch backend, BitsandbytesBackend::cpu in
kernels/nf4.h); 8-bit saving needs no GPU either. Each folder also holds `expected.safetensors`:
the fixed token ids; `logits`: transformers reading the saved checkpoint back and running it with
bitsandbytes' CPU kernels (dtype float32: norms, embeddings and LM head upcast, 4-bit compute dtype
float32; those kernels still compute the 4-bit and 8-bit products at reduced precision);
`logits_fp32_dequantized`: transformers' Llama in fp32 with each quantized weight replaced by
bitsandbytes' fp32 dequantization of the saved bytes; and bitsandbytes' own dequantization of two
weights (4-bit into the quant_state dtype, as it does by default). For 8-bit the logits are taken in train() mode (dropout is 0):
on the CPU bitsandbytes then runs MatMul8bitFp, weight dequantized (CB * SCB / 127) then an fp32
matmul, which is what qlora computes; eval() mode would add LLM.int8's activation quantization.

Needs: pip install torch transformers bitsandbytes safetensors accelerate. CI does not run this;
the outputs are committed under tests/fixtures/bnb/.
"""
import json
import os
import shutil

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bnb")
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)
CHECKED_WEIGHTS = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def make_source(folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG), dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            offset = 1.0 if "norm" in name else 0.0
            parameter.copy_(torch.randn_like(parameter) * 0.08 + offset)
    model.to(torch.bfloat16).save_pretrained(folder)


def input_ids():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=generator)


def dequantized(tensors, module, dtype=None):
    """bitsandbytes' own dequantization of the saved bytes (the in-memory CPU model may be repacked).
    4-bit weights decode into the quant_state dtype unless `dtype` overrides it."""
    weight = module + ".weight"
    if module + ".SCB" in tensors:
        return bnb_functional.int8_vectorwise_dequant(tensors[weight], tensors[module + ".SCB"]).to(torch.float32)
    state_entries = {key[len(weight) + 1:]: value for key, value in tensors.items() if key.startswith(weight + ".")}
    state = bnb_functional.QuantState.from_dict(state_entries, device=torch.device("cpu"))
    if dtype is not None:
        state.dtype = dtype
    return bnb_functional.dequantize_4bit(tensors[weight], state).to(torch.float32)


def fp32_logits(folder, saved, ids):
    """transformers' Llama in fp32 with every quantized weight replaced by its fp32 dequantization."""
    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, _ in model.named_parameters():
        if saved[name].dtype in (torch.float16, torch.bfloat16):
            state[name] = saved[name].to(torch.float32)
        else:
            state[name] = dequantized(saved, name[:-len(".weight")], torch.float32)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.to(torch.float32)


def make_variant(source, name, quantization, dtype):
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization, device_map="cpu",
                                                 dtype=dtype)
    model.save_pretrained(folder)
    for extra in os.listdir(folder):
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(folder, extra))
    # The reference is the saved checkpoint as transformers reads it back, computed in fp32 (the
    # 16-bit norms, embeddings and LM head upcast), which is what qlora computes with.
    reloaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    if quantization.load_in_8bit:
        reloaded.train()
    else:
        reloaded.eval()
    ids = input_ids()
    with torch.no_grad():
        logits = reloaded(ids).logits.to(torch.float32)
    saved = load_file(os.path.join(folder, "model.safetensors"))
    expected = {"input_ids": ids.to(torch.int64), "logits": logits.contiguous(),
                "logits_fp32_dequantized": fp32_logits(folder, saved, ids).contiguous()}
    for module in CHECKED_WEIGHTS:
        expected[module + ".dequantized"] = dequantized(saved, module).contiguous()
    save_file(expected, os.path.join(folder, "expected.safetensors"))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    source = os.path.join(OUT, "source")
    make_source(source)
    os.remove(os.path.join(source, "generation_config.json"))
    four_bit = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    make_variant(source, "nf4_double_quant",
                 BitsAndBytesConfig(**four_bit, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                 torch.bfloat16)
    make_variant(source, "nf4", BitsAndBytesConfig(**four_bit, bnb_4bit_quant_type="nf4"), torch.bfloat16)
    make_variant(source, "fp4", BitsAndBytesConfig(**four_bit, bnb_4bit_quant_type="fp4"), torch.bfloat16)
    make_variant(source, "int8", BitsAndBytesConfig(load_in_8bit=True), torch.float16)
    with open(os.path.join(OUT, "VERSIONS"), "w") as versions:
        versions.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                       f"bitsandbytes {bitsandbytes.__version__}\n")


if __name__ == "__main__":
    main()
