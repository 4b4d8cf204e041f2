"""Profile what one Python worker does per tile: the overlap and decode functions of the
pipeline, run in-process (no Spark) on the benchmark slide's kept tiles, under cProfile.

    .venv/bin/python bench/profile_worker.py [--reader auto|openslide] [--tiles 2000]

Needs ``bench/data/kept.npy`` and the synthetic slide from ``bench/throughput.py``. Prints the
per-tile cost and the top functions by cumulative time (the basis of "where the time goes" in
``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", default=str(HERE / "data" / "synthetic-40960x30720.svs"))
    ap.add_argument("--reader", default="auto")
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--encoding", default="raw")
    a = ap.parse_args()
    from slidelake.config import DecodeConfig
    from slidelake.decode import make_decoder

    kept = np.load(HERE / "data" / "kept.npy")[: a.tiles]
    n = len(kept)
    pdf = pd.DataFrame({
        "slide_id": "s", "path": a.slide, "fingerprint": "f", "level": kept[:, 2].astype(np.int32),
        "level_downsample": 1.0, "level0_x": kept[:, 0], "level0_y": kept[:, 1], "read_width": 256,
        "read_height": 256, "tile_extent_x": 256, "tile_extent_y": 256, "valid_width": 256, "valid_height": 256,
        "tile_x": kept[:, 0], "tile_y": kept[:, 1],
    })
    decode = make_decoder(DecodeConfig(encoding=a.encoding, reader=a.reader))
    list(decode(iter([pdf.iloc[:50]])))  # open handles, warm caches
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    out = list(decode(iter([pdf])))
    prof.disable()
    wall = time.perf_counter() - t
    assert sum(len(o) for o in out) == n
    print(f"{n} tiles, reader={a.reader}, encoding={a.encoding}: {wall / n * 1000:.2f} ms/tile "
          f"({n / wall:.0f} tiles/s on one core, under cProfile)")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    print(s.getvalue())


if __name__ == "__main__":
    main()
