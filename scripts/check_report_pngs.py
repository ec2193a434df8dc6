#!/usr/bin/env python3
"""Cross-checks the PNGs `qlora report` wrote with decoders that share nothing with ours.

Usage: python scripts/check_report_pngs.py runs/NAME/report
Needs Pillow, numpy and matplotlib (not part of the build or CI; a one-off check). For each PNG:
chunk CRCs via zlib.crc32, the IDAT stream via zlib.decompress (which also checks Adler-32),
un-filtering in numpy, and the pixels compared with Pillow's and matplotlib's decodes.
"""
import struct
import sys
import zlib
from pathlib import Path

import matplotlib.image
import numpy as np
from PIL import Image


def unfilter(raw, width, height):
    stride = width * 3
    out = np.zeros((height, stride), dtype=np.int32)
    filters = []
    for y in range(height):
        kind = raw[y * (stride + 1)]
        filters.append(kind)
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        up = out[y - 1] if y > 0 else np.zeros(stride, dtype=np.int32)
        row = np.zeros(stride, dtype=np.int32)
        for i in range(stride):
            a = row[i - 3] if i >= 3 else 0
            b = up[i]
            c = up[i - 3] if i >= 3 else 0
            if kind == 0:
                p = 0
            elif kind == 1:
                p = a
            elif kind == 2:
                p = b
            elif kind == 3:
                p = (a + b) // 2
            elif kind == 4:
                e = a + b - c
                pa, pb, pc = abs(e - a), abs(e - b), abs(e - c)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            else:
                raise ValueError(f"filter type {kind}")
            row[i] = (line[i] + p) & 0xFF
        out[y] = row
    return out.reshape(height, width, 3).astype(np.uint8), filters


def check(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "signature"
    at, idat, chunks = 8, b"", []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind = data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"CRC of {kind}"
        chunks.append(kind.decode())
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, colour, interlace) == (8, 2, 0)
        if kind == b"IDAT":
            idat += body
        at += 12 + length
    ours, filters = unfilter(zlib.decompress(idat), width, height)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pillow = np.asarray(image.convert("RGB"))
        assert image.mode == "RGB" and image.size == (width, height)
    plotted = (matplotlib.image.imread(path) * 255).round().astype(np.uint8)
    assert np.array_equal(ours, pillow), "numpy un-filtering differs from Pillow"
    assert np.array_equal(pillow, plotted[..., :3]), "Pillow differs from matplotlib"
    colours = len(np.unique(pillow.reshape(-1, 3), axis=0))
    print(f"{path.name}: {width}x{height}, {len(data)} bytes ({len(data) / (width * height * 3):.1%} of raw), "
          f"chunks {chunks}, filters used {sorted(set(filters))}, {colours} colours: CRCs, Adler-32, "
          f"Pillow and matplotlib agree")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    pngs = sorted(folder.glob("*.png"))
    assert pngs, f"no PNG in {folder}"
    for png in pngs:
        check(png)
