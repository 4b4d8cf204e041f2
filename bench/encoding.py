"""Measure tile encodings (ms/tile encode, ms/tile decode, bytes/tile) on real tissue tiles.

    .venv/bin/python bench/encoding.py [slide.svs] > docs/encoding.json

Reads every 256 px level-0 tile of the slide (default: the CMU-1 sample) whose background
fraction is <= 0.9, encodes each with every format, and prints JSON with medians.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openslide

from slidelake.decode import read_tile, tile_stats
from slidelake.encoding import decode_tile, encode_tile

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "slides" / "aperio" / "CMU-1-Small-Region.svs"
FORMATS = [("raw", 0), ("png", 0), ("jpeg", 90), ("jpeg", 80), ("webp", 90)]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT)
    tiles = []
    with openslide.OpenSlide(path) as s:
        w, h = s.dimensions
        for y in range(0, h - 255, 256):
            for x in range(0, w - 255, 256):
                rgb = read_tile(s, x, y, 0, (256, 256), (256, 256), (256, 256))
                if tile_stats(rgb, 220)[2] <= 0.9:
                    tiles.append(rgb)
    out = {"slide": Path(path).name, "tiles": len(tiles), "tile_px": 256,
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "formats": []}
    for fmt, q in FORMATS:
        enc_ms, dec_ms, sizes, err = [], [], [], []
        for rgb in tiles:
            t = time.perf_counter()
            data = encode_tile(rgb, fmt, q or 90)
            enc_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            back = decode_tile(data, fmt, 256, 256)
            dec_ms.append((time.perf_counter() - t) * 1e3)
            sizes.append(len(data))
            err.append(float(np.abs(back.astype(np.int16) - rgb).mean()))
        out["formats"].append({
            "format": fmt if not q else f"{fmt} q{q}",
            "encode_ms_median": round(statistics.median(enc_ms), 3),
            "decode_ms_median": round(statistics.median(dec_ms), 3),
            "bytes_median": int(statistics.median(sizes)),
            "mean_abs_error": round(statistics.mean(err), 3),
        })
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
