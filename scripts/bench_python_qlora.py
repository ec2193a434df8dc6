#!/usr/bin/env python3
"""The peer benchmark: the same QLoRA fine-tuning step in Python with transformers + PEFT +
bitsandbytes on this CPU, for bench/bench_training.cpp to be compared against.

SmolLM2-135M shape (random weights saved once, then loaded in 4-bit NF4 through
BitsAndBytesConfig), PEFT's prepare_model_for_kbit_training, LoRA r=16 on all projections,
micro-batch 4 x 256 tokens, AdamW. One configuration per process so peak RSS is its own (the random
model is built and saved by a child process, so the peak is loading plus training, not model creation):
  python scripts/bench_python_qlora.py --checkpointing on|off [--steps 3]
Prints and appends to bench/results/python_peer.json. Needs: torch transformers peft bitsandbytes.
"""
import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def save_random_model(folder):
    """Runs in a child process so that building the fp32 model does not count in the measured peak."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(smollm2_shape()).to(torch.bfloat16).save_pretrained(folder)


def smollm2_shape():
    return transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                    tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    with tempfile.TemporaryDirectory() as folder:
        child = multiprocessing.get_context("spawn").Process(target=save_random_model, args=(folder,))
        child.start()
        child.join()
        assert child.exitcode == 0, "building the random model failed"
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32,
                                                       bnb_4bit_use_double_quant=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                                  device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=arguments.checkpointing == "on")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    text = open(os.path.join(ROOT, "launcher", "demo", "austen_excerpt.txt"), "rb").read()
    tokens = torch.tensor(list(text), dtype=torch.int64)
    times = []
    for step in range(arguments.steps + 1):  # the first step warms up and is not timed
        starts = torch.randint(0, len(tokens) - 257, (4,), generator=torch.Generator().manual_seed(step))
        batch = torch.stack([tokens[s:s + 256] for s in starts.tolist()])
        begin = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step > 0:
            times.append(time.perf_counter() - begin)
    tokens_per_second = 4 * 256 * len(times) / sum(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"gradient_checkpointing": arguments.checkpointing == "on", "tokens_per_second": tokens_per_second,
           "peak_rss_bytes": peak_rss, "threads": arguments.threads, "steps_timed": len(times),
           "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(row))
    path = os.path.join(ROOT, "bench", "results", "python_peer.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    rows = [r for r in rows if r["gradient_checkpointing"] != row["gradient_checkpointing"]] + [row]
    json.dump(rows, open(path, "w"), indent=2)


if __name__ == "__main__":
    main()
