#!/usr/bin/env python3
"""Golden Q8_0 encodings for kernels::quantize_q8_0 (tests/kernels/test_ggml_blocks.cpp).

The expected bytes come from the gguf package's quantizer (gguf.quants.quantize, the numpy mirror of
ggml's quantize_row_q8_0_ref that llama.cpp's convert_hf_to_gguf.py uses), never from qlora.
Blocks cover: random normals at several scales, an all-zero block, exact halves after scaling
(round half away from zero), a block whose largest magnitude is negative, subnormal-scale blocks
and values near the fp16 range.

Output: tests/fixtures/merge/q8_0_quantize.safetensors with "input" (F32 [n]) and "expected"
(U8 [n / 32 * 34]); versions in tests/fixtures/merge/VERSIONS.
Needs: pip install gguf numpy safetensors. Run from anywhere:
  python scripts/make_q8_0_fixtures.py
"""
import importlib.metadata
import os

import gguf
import numpy as np
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "merge")


def main():
    rng = np.random.default_rng(20261204)
    blocks = []
    for scale in (1.0, 0.02, 1e-3, 300.0):
        blocks.append(rng.standard_normal((8, 32)).astype(np.float32) * np.float32(scale))
    blocks.append(np.zeros((1, 32), np.float32))
    halves = np.arange(-16, 16, dtype=np.float32) + np.float32(0.5)   # max 15.5 -> d = 15.5/127
    halves[0] = np.float32(-127.0)                                    # d = 1: every x*id is x exactly
    blocks.append(halves.reshape(1, 32))
    negative = rng.uniform(-1, 1, (1, 32)).astype(np.float32)
    negative[0, 5] = np.float32(-4.0)
    blocks.append(negative)
    blocks.append(rng.standard_normal((2, 32)).astype(np.float32) * np.float32(1e-9))   # fp16 subnormal d
    blocks.append(rng.standard_normal((1, 32)).astype(np.float32) * np.float32(6e5))    # d near fp16's max
    values = np.concatenate([b.reshape(-1, 32) for b in blocks]).reshape(-1)
    encoded = gguf.quants.quantize(values.reshape(-1, 32), gguf.GGMLQuantizationType.Q8_0)
    encoded = np.ascontiguousarray(encoded, dtype=np.uint8).reshape(-1)
    assert encoded.size == values.size // 32 * 34
    os.makedirs(OUT, exist_ok=True)
    save_file({"input": values, "expected": encoded}, os.path.join(OUT, "q8_0_quantize.safetensors"))
    with open(os.path.join(OUT, "VERSIONS"), "w") as versions:
        for package in ("gguf", "numpy", "safetensors"):
            versions.write(f"{package} {importlib.metadata.version(package)}\n")
    print(f"wrote {values.size // 32} Q8_0 blocks to {OUT}")


if __name__ == "__main__":
    main()
