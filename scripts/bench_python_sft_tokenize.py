#!/usr/bin/env python3
"""The Python peer of bench/bench_sft_tokenize: transformers' apply_chat_template(tokenize=True) (the
Rust `tokenizers` underneath, as TRL's SFTTrainer calls it per example) over the JSONL of conversations
the benchmark writes, with SmolLM2-135M-Instruct's tokenizer and chat template loaded from its GGUF.
Prints examples/s and tokens/s; the token total must equal the benchmark's.

Run with the fixture venv after bench_sft_tokenize:
  /work/fixvenv/bin/python scripts/bench_python_sft_tokenize.py SmolLM2-135M-Instruct.Q4_1.gguf \
      /tmp/qlora-bench-sft/austen_chats.jsonl
"""
import json
import os
import sys
import time

from transformers import AutoTokenizer


def main():
    gguf, data = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with open(data, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    start = time.perf_counter()
    tokens = 0
    for record in records:
        tokens += len(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"])
    seconds = time.perf_counter() - start
    print(f"transformers apply_chat_template: {len(records) / seconds:.0f} examples/s, {tokens / seconds:.0f} tokens/s "
          f"({tokens} tokens, {seconds:.2f} s)")


if __name__ == "__main__":
    main()
