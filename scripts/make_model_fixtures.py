#!/usr/bin/env python3
"""Golden fixtures for model parity (tests/model/test_parity.cpp).

For three small configurations (Llama 2 style; Llama 3 style with llama3 rope scaling and tied
embeddings; Qwen2 with q/k/v biases) this builds the transformers model, attaches PEFT LoRA on all
seven projections, and records logits, loss and every LoRA gradient for a fixed batch: once with
the weights as they are, once with every decoder-block linear replaced by its bitsandbytes NF4
round trip (blocksize 64), which is what qlora computes with after `qlora convert`.

Needs: pip install torch transformers peft bitsandbytes safetensors. CI does not run this; the
outputs are committed under tests/fixtures/model/.
"""
import json
import os
import sys

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "model")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def variants():
    common = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=16384, rms_norm_eps=1e-5)
    yield "llama", transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    yield "llama3_tied", transformers.LlamaConfig(
        **common, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    yield "qwen2", transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)


def build(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Visible scales so every path matters (norm weights around one), then rounded to bf16,
            # the dtype the checkpoint is saved in, so both sides start from identical values.
            offset = 1.0 if "norm" in name else 0.0
            parameter.copy_(torch.randn_like(parameter) * 0.08 + offset)
            parameter.copy_(parameter.to(torch.bfloat16).to(torch.float32))
    return model


def nf4_round_trip(weight):
    packed, state = bnb_functional.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4",
                                                 compress_statistics=False)
    return bnb_functional.dequantize_4bit(packed, state).to(torch.float32)


def run(model, input_ids):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none",
                      task_type="CAUSAL_LM")
    torch.manual_seed(1)
    wrapped = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a random B makes A's gradient non-trivial
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    output = wrapped(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    adapters, gradients = {}, {}
    for name, parameter in wrapped.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            adapters[key] = parameter.detach().clone()
            gradients[key] = parameter.grad.detach().clone()
    return output.logits.detach(), output.loss.detach(), adapters, gradients


def main():
    torch.manual_seed(2)
    input_ids = torch.randint(0, 300, (2, 16), dtype=torch.int64)
    for name, config in variants():
        folder = os.path.join(OUT, name)
        hf_folder = os.path.join(folder, "hf")
        os.makedirs(hf_folder, exist_ok=True)
        model = build(config)
        model.to(torch.bfloat16).save_pretrained(hf_folder, safe_serialization=True)
        expected = {"input_ids": input_ids}

        dense = build(config)
        logits, loss, adapters, gradients = run(dense, input_ids)
        expected["logits_dense"] = logits
        expected["loss_dense"] = loss.reshape(1)
        for key, value in gradients.items():
            expected["grad_dense." + key] = value

        quantized = build(config)
        with torch.no_grad():
            for module_name, module in quantized.named_modules():
                if module_name.split(".")[-1] in PROJECTIONS:
                    module.weight.copy_(nf4_round_trip(module.weight))
        logits_nf4, loss_nf4, adapters_nf4, gradients_nf4 = run(quantized, input_ids)
        for key in adapters:
            assert torch.equal(adapters[key], adapters_nf4[key])
        expected["logits_nf4"] = logits_nf4
        expected["loss_nf4"] = loss_nf4.reshape(1)
        for key, value in gradients_nf4.items():
            expected["grad_nf4." + key] = value

        save_file({k: v.contiguous() for k, v in adapters.items()}, os.path.join(folder, "adapter.safetensors"))
        save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(folder, "expected.safetensors"))
        print(f"{name}: loss dense {loss.item():.6f}, nf4 {loss_nf4.item():.6f}, {len(adapters)} adapter tensors")
    with open(os.path.join(OUT, "VERSIONS"), "w") as versions:
        versions.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\npeft {peft.__version__}\n"
                       f"bitsandbytes {bitsandbytes.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
