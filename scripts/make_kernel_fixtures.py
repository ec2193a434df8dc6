#!/usr/bin/env python3
# Writes the golden fixtures of the kernels/ codecs (tests/fixtures/kernels/*.qkf): inputs and the
# exact bytes and values bitsandbytes produces for them, so the C++ tests can compare bytewise without
# Python. Needs `pip install torch bitsandbytes` (bitsandbytes runs on CPU). Run from the repo root:
#   python3 scripts/make_kernel_fixtures.py                 # CPU backend -> tests/fixtures/kernels/
#   python3 scripts/make_kernel_fixtures.py --device cuda   # CUDA backend -> tests/fixtures/kernels/cuda/
#
# File format (little-endian), read by tests/kernels/fixture_reader.h:
#   "QKF1"                                  magic
#   repeated until end of file:
#     u16 name length, name (ASCII)
#     u8  kind: 's' UTF-8 text, 'f' float32, 'h' float16 bits, 'b' bfloat16 bits, 'B' uint8, 'c' int8
#     u64 element count, then the elements
# Every file has a "meta" text entry of space-separated key=value pairs.
import argparse
import copy
import os
import struct
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnb_functional  # noqa: E402

KIND_OF_DTYPE = {
    torch.float32: "f",
    torch.float16: "h",
    torch.bfloat16: "b",
    torch.uint8: "B",
    torch.int8: "c",
}
DTYPE_NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class FixtureFile:
    def __init__(self, path):
        self.path = path
        self.entries = []

    def text(self, name, value):
        self.entries.append((name, "s", value.encode("utf-8"), len(value.encode("utf-8"))))

    def tensor(self, name, tensor):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        kind = KIND_OF_DTYPE[tensor.dtype]
        if tensor.dtype in (torch.float16, torch.bfloat16):
            raw = tensor.view(torch.int16).numpy().astype("<i2").tobytes()
        elif tensor.dtype == torch.float32:
            raw = tensor.numpy().astype("<f4").tobytes()
        else:
            raw = tensor.numpy().tobytes()
        self.entries.append((name, kind, raw, tensor.numel()))

    def write(self):
        with open(self.path, "wb") as out:
            out.write(b"QKF1")
            for name, kind, raw, count in self.entries:
                encoded = name.encode("ascii")
                out.write(struct.pack("<H", len(encoded)))
                out.write(encoded)
                out.write(kind.encode("ascii"))
                out.write(struct.pack("<Q", count))
                out.write(raw)
        return os.path.getsize(self.path)


def probe_values():
    """Scaled values on and beside every rounding boundary of NF4 and FP4 (both backends' boundaries)."""
    nf4 = bnb_functional.get_4bit_type("nf4", device="cpu").float()
    nf4_midpoints = ((nf4[:-1] + nf4[1:]) / 2).tolist()
    fp4 = bnb_functional.get_4bit_type("fp4", device="cpu").float()
    fp4_sorted = torch.sort(fp4).values
    fp4_midpoints = ((fp4_sorted[:-1] + fp4_sorted[1:]) / 2).tolist()
    # The literal thresholds of bitsandbytes' CUDA dQuantizeFP4 decision tree.
    fp4_cuda = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
    values = []
    for boundary in nf4_midpoints + fp4_midpoints + fp4_cuda + [-t for t in fp4_cuda]:
        b = np.float32(boundary)
        values += [b, np.nextafter(b, np.float32(2)), np.nextafter(b, np.float32(-2))]
    values += nf4.tolist() + fp4.tolist() + [0.0, -0.0, 1e-9, -1e-9]
    return np.array(values, dtype=np.float32)


def make_weight(rows, cols, blocksize, dtype, generator):
    """A normal weight with edge-case blocks laid over its first blocks (when it has room)."""
    n = rows * cols
    flat = torch.randn(n, generator=generator, dtype=torch.float32) * 0.05
    if dtype == torch.float16:
        huge, tiny, subnormal = 6.0e4, 1.0e-4, 3.0e-7  # float16 overflows past 65504
    else:
        huge, tiny, subnormal = 1.0e30, 1.0e-30, 1.0e-40
    edge_blocks = [
        torch.zeros(blocksize),
        torch.full((blocksize,), 0.3),
        torch.randn(blocksize, generator=generator) * huge / 4,
        torch.randn(blocksize, generator=generator) * tiny,
        torch.randn(blocksize, generator=generator) * subnormal,
        torch.cat([torch.tensor([huge / 2, -huge / 3]), torch.randn(blocksize - 2, generator=generator) * tiny]),
        -torch.rand(blocksize, generator=generator) * 2.5,
    ]
    # Boundary probes: each block starts with +-1.0 so its absmax is exactly 1 and scaling is exact.
    probes = torch.from_numpy(probe_values())
    per_block = blocksize - 1
    for start in range(0, probes.numel(), per_block):
        chunk = probes[start : start + per_block]
        lead = 1.0 if (start // per_block) % 2 == 0 else -1.0
        block = torch.cat([torch.tensor([lead]), chunk, torch.zeros(per_block - chunk.numel())])
        edge_blocks.append(block)
    offset = 0
    for block in edge_blocks:
        if offset + blocksize > n - blocksize:  # keep the last (often partial) block random
            break
        flat[offset : offset + blocksize] = block
        offset += blocksize
    return flat.reshape(rows, cols).to(dtype)


def dequantize_as(packed, state, dtype):
    state = copy.copy(state)
    state.dtype = dtype
    return bnb_functional.dequantize_4bit(packed, state)


def write_4bit_case(directory, quant_type, blocksize, dtype, rows, cols, nested, generator, device):
    weight = make_weight(rows, cols, blocksize, dtype, generator)
    packed, state = bnb_functional.quantize_4bit(
        weight.to(device), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    name = f"{quant_type}_bs{blocksize}_{DTYPE_NAME[dtype]}_{rows}x{cols}{'_nested' if nested else ''}"
    fixture = FixtureFile(os.path.join(directory, name + ".qkf"))
    fixture.text(
        "meta",
        f"kind=4bit quant_type={quant_type} blocksize={blocksize} input_dtype={DTYPE_NAME[dtype]} "
        f"rows={rows} cols={cols} n={rows * cols} nested={int(nested)} device={device}",
    )
    fixture.tensor("input", weight)
    fixture.tensor("packed", packed.reshape(-1))
    if nested:
        fixture.tensor("absmax_codes", state.absmax)
        fixture.tensor("nested_absmax", state.state2.absmax)
        fixture.tensor("nested_code", state.state2.code)
        fixture.tensor("offset", state.offset.reshape(1).float())
        fixture.text("nested_blocksize", str(state.state2.blocksize))
        # The plain per-block absmax, from the same quantization without compression.
        _, plain_state = bnb_functional.quantize_4bit(weight.to(device), blocksize=blocksize, quant_type=quant_type)
        fixture.tensor("absmax", plain_state.absmax)
    else:
        fixture.tensor("absmax", state.absmax)
    fixture.tensor("quant_map", state.code)
    fixture.tensor("dequantized", dequantize_as(packed, state, dtype))
    if dtype != torch.float32:
        fixture.tensor("dequantized_f32", dequantize_as(packed, state, torch.float32))
    elif not nested:  # keeps the fixtures small; the 16-bit outputs are covered by the plain cases
        fixture.tensor("dequantized_bf16", dequantize_as(packed, state, torch.bfloat16))
        fixture.tensor("dequantized_f16", dequantize_as(packed, state, torch.float16))
    return fixture.write()


def write_absmax_case(directory, name, absmax, device):
    """Double quantization of a given absmax vector alone (as quantize_4bit does with compress_statistics)."""
    absmax = absmax.float().to(device)
    offset = absmax.mean()
    codes, state2 = bnb_functional.quantize_blockwise(absmax - offset, blocksize=256)
    restored = bnb_functional.dequantize_blockwise(codes, state2) + offset
    fixture = FixtureFile(os.path.join(directory, name + ".qkf"))
    fixture.text("meta", f"kind=double_quant blocks={absmax.numel()} device={device}")
    fixture.tensor("absmax", absmax)
    fixture.tensor("offset", offset.reshape(1))
    fixture.tensor("absmax_codes", codes)
    fixture.tensor("nested_absmax", state2.absmax)
    fixture.tensor("nested_code", state2.code)
    fixture.tensor("restored_absmax", restored)
    return fixture.write()


def write_int8_case(directory, name, weight, device):
    """LLM.int8 weights as Linear8bitLt stores them: the weight cast to float16, then row-wise int8."""
    weight16 = weight.to(torch.float16).to(device)
    codes, row_absmax, _ = bnb_functional.int8_vectorwise_quant(weight16)
    fixture = FixtureFile(os.path.join(directory, name + ".qkf"))
    rows, cols = weight.shape
    fixture.text(
        "meta", f"kind=int8 input_dtype={DTYPE_NAME[weight.dtype]} rows={rows} cols={cols} device={device}"
    )
    fixture.tensor("input", weight)
    fixture.tensor("codes", codes)
    fixture.tensor("row_absmax", row_absmax)
    fixture.tensor("dequantized", bnb_functional.int8_vectorwise_dequant(codes, row_absmax))
    return fixture.write()


def main():
    parser = argparse.ArgumentParser(description="Write the golden fixtures of the kernels/ codecs.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="output folder (default tests/fixtures/kernels[/cuda])")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    directory = args.out or os.path.join(root, "tests", "fixtures", "kernels", *(["cuda"] if args.device == "cuda" else []))
    os.makedirs(directory, exist_ok=True)
    for stale in os.listdir(directory):
        if stale.endswith(".qkf"):
            os.remove(os.path.join(directory, stale))

    generator = torch.Generator().manual_seed(20240611)
    total = 0
    # Shapes: odd column counts take bitsandbytes' pure-torch dequantization path, even ones its C++
    # kernel; sizes are not multiples of the blocksize so the last block is partial.
    shapes = {32: (9, 67), 64: (11, 77), 128: (7, 150), 256: (5, 333), 4096: (3, 2900)}
    for quant_type in ("nf4", "fp4"):
        for blocksize, (rows, cols) in shapes.items():
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                total += write_4bit_case(directory, quant_type, blocksize, dtype, rows, cols, False, generator, args.device)
        # Exact multiple of the blocksize (no partial block), even columns.
        total += write_4bit_case(directory, quant_type, 64, torch.float32, 16, 128, False, generator, args.device)
        # Double quantization: enough blocks for three nested blocks of 256, the last one partial.
        total += write_4bit_case(directory, quant_type, 64, torch.bfloat16, 12, 1600, True, generator, args.device)
        total += write_4bit_case(directory, quant_type, 32, torch.float32, 8, 1603, True, generator, args.device)

    total += write_absmax_case(directory, "double_quant_lognormal", torch.exp(torch.randn(700, generator=generator)), args.device)
    total += write_absmax_case(directory, "double_quant_constant", torch.full((300,), 0.125), args.device)
    spread = torch.rand(513, generator=generator) * 3
    spread[0], spread[300] = 0.0, 40.0
    total += write_absmax_case(directory, "double_quant_spread", spread, args.device)

    weight = torch.randn(16, 300, generator=generator) * 0.02
    weight[3] = 0.0
    weight[5, 7] = 65504.0
    weight[6] = torch.randn(300, generator=generator) * 1e-6  # float16 subnormals
    weight[7, 0] = -4.0
    total += write_int8_case(directory, "int8_f32_16x300", weight, args.device)
    total += write_int8_case(directory, "int8_bf16_5x33", (torch.randn(5, 33, generator=generator) * 3).to(torch.bfloat16), args.device)
    total += write_int8_case(directory, "int8_f16_8x64", (torch.randn(8, 64, generator=generator)).to(torch.float16), args.device)

    tables = FixtureFile(os.path.join(directory, "tables.qkf"))
    tables.text("meta", f"kind=tables device={args.device}")
    tables.tensor("nf4", bnb_functional.get_4bit_type("nf4", device="cpu"))
    tables.tensor("fp4", bnb_functional.get_4bit_type("fp4", device="cpu"))
    tables.tensor("dynamic", bnb_functional.create_dynamic_map())
    total += tables.write()

    with open(os.path.join(directory, "VERSIONS"), "w") as versions:
        versions.write(f"torch {torch.__version__}\nbitsandbytes {bitsandbytes.__version__}\ndevice {args.device}\n")
    print(f"wrote {directory}: {total} bytes (torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__})")


if __name__ == "__main__":
    sys.exit(main())
