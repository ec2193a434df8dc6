#!/usr/bin/env python3
"""Golden fixtures for DoRA (tests/model/test_dora.cpp): PEFT's LoraConfig(use_dora=True) on the small
Llama fixture model (tests/fixtures/model/llama/hf), all seven projections, r=4, alpha=8.

Two cases, each recording the adapter (lora_A, lora_B, lora_magnitude_vector), logits, loss and the
gradient of every adapter tensor for a fixed batch:
  dense: the fp32 model as stored (bf16 values);
  nf4:   the same checkpoint loaded through bitsandbytes' 4-bit Linear (nf4, blocksize 64, no double
         quantization, fp32 compute), i.e. QDoRA as PEFT runs it; PEFT initialises the magnitudes
         from the dequantized 4-bit weights.
lora_B is seeded nonzero after PEFT built the adapter (PEFT starts it at zero), so the weight norm
||W + scaling * B A|| differs from the magnitude and every term of the DoRA output matters. The
magnitudes are left as PEFT initialised them: the test also checks qlora's initialisation.

The dense case is also saved with PEFT's save_pretrained (peft_adapter/), the folder qlora must load.

Run: /work/fixvenv/bin/python scripts/make_dora_fixtures.py
Needs: pip install torch transformers peft bitsandbytes safetensors. CI does not run this; the outputs
are committed under tests/fixtures/dora/.
"""
import json
import os
import shutil
import sys

import bitsandbytes
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE = os.path.join(ROOT, "tests", "fixtures", "model", "llama", "hf")
OUT = os.path.join(ROOT, "tests", "fixtures", "dora")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(nf4):
    if not nf4:
        return transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32,
                                                   bnb_4bit_use_double_quant=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE, quantization_config=quantization,
                                                              dtype=torch.float32, device_map="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.blocksize == 64
    return model


def dora_model(nf4):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none",
                        use_dora=True, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    wrapped = get_peft_model(load_base(nf4), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    return wrapped


def adapter_key(name):
    # named_parameters: ...q_proj.lora_magnitude_vector.default.weight; PEFT's file drops
    # ".default" and keeps the magnitude without ".weight" (checked against save_pretrained below).
    key = name.replace(".default", "")
    if key.endswith("lora_magnitude_vector.weight"):
        key = key[: -len(".weight")]
    return key


def run(nf4, input_ids):
    wrapped = dora_model(nf4)
    wrapped.train()
    output = wrapped(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    adapters, gradients = {}, {}
    for name, parameter in wrapped.named_parameters():
        if "lora_" in name:
            adapters[adapter_key(name)] = parameter.detach().clone()
            gradients[adapter_key(name)] = parameter.grad.detach().clone()
    return wrapped, output.logits.detach(), output.loss.detach(), adapters, gradients


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(2)
    input_ids = torch.randint(0, 300, (2, 16), dtype=torch.int64)
    for kind in ["dense", "nf4"]:
        wrapped, logits, loss, adapters, gradients = run(kind == "nf4", input_ids)
        expected = {"input_ids": input_ids, "logits": logits, "loss": loss.reshape(1)}
        for key, value in gradients.items():
            expected["grad." + key] = value
        save_file({k: v.contiguous() for k, v in adapters.items()}, os.path.join(OUT, f"adapter_{kind}.safetensors"))
        save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(OUT, f"expected_{kind}.safetensors"))
        magnitudes = sum(1 for key in adapters if key.endswith("lora_magnitude_vector"))
        print(f"{kind}: loss {loss.item():.6f}, {len(adapters)} adapter tensors ({magnitudes} magnitude vectors)")
        if kind == "dense":
            folder = os.path.join(OUT, "peft_adapter")
            shutil.rmtree(folder, ignore_errors=True)
            wrapped.save_pretrained(folder)
            from safetensors import safe_open
            with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as saved:
                assert sorted(saved.keys()) == sorted(adapters.keys()), "PEFT's saved keys differ from the fixture's"
            # The folder is committed: name the base model by its place in the repository.
            config_path = os.path.join(folder, "adapter_config.json")
            with open(config_path) as config_file:
                config = json.load(config_file)
            config["base_model_name_or_path"] = "tests/fixtures/model/llama/hf"
            with open(config_path, "w") as config_file:
                json.dump(config, config_file, indent=2, sort_keys=True)
                config_file.write("\n")
            readme = os.path.join(folder, "README.md")
            if os.path.exists(readme):
                os.remove(readme)
    with open(os.path.join(OUT, "VERSIONS"), "w") as versions:
        versions.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\npeft {peft.__version__}\n"
                       f"bitsandbytes {bitsandbytes.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
