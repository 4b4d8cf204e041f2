"""Profile what one Python worker does per tile: the pipeline's decoder (``TileDecoder``), run in-process
(no Spark) on the tiles a benchmark run kept, under cProfile.

    .venv/bin/python bench/profile_worker.py [--kept bench/data/kept.parquet] [--reader auto|openslide]
                                             [--tiles 2000] [--encoding raw]

``--kept`` is the kept-tiles file ``bench/throughput.py`` writes (``bench/data/kept.parquet``,
columns ``path, level0_x, level0_y, level``; :func:`throughput.load_kept`), so the run needs a
finished benchmark run first. Prints the per-tile cost and the top functions by own time (the
basis of "where the time goes" in ``docs/benchmarks.md``).

``OMP_NUM_THREADS`` is set to 1 before NumPy loads, as PySpark does for its Python workers
(``spark.task.cpus``): NumPy's BLAS would otherwise start a thread per core for the dot product
in ``tile_stats``, and two such processes on two cores ran 4x slower per tile here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> dict:
    """Profile the decode of the first ``--tiles`` kept tiles; returns ``{"tiles", "ms_per_tile",
    "decoded", "failed"}`` and prints the profile."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--kept", default=str(HERE / "data" / "kept.parquet"))
    ap.add_argument("--reader", default="auto")
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--encoding", default="raw")
    a = ap.parse_args(argv)
    from throughput import load_kept

    from slidelake.config import DecodeConfig
    from slidelake.decode import TileDecoder

    frames = []
    for path, c in load_kept(a.kept):
        frames.append(pd.DataFrame({
            "slide_id": path, "path": path, "fingerprint": "f", "level": c[:, 2].astype("int32"),
            "level_downsample": 1.0, "level0_x": c[:, 0], "level0_y": c[:, 1], "read_width": 256,
            "read_height": 256, "tile_extent_x": 256, "tile_extent_y": 256, "valid_width": 256,
            "valid_height": 256, "tile_x": c[:, 0], "tile_y": c[:, 1],
        }))
    pdf = pd.concat(frames, ignore_index=True).iloc[: a.tiles]
    if (pdf["level"] != 0).any():
        raise SystemExit("profile_worker reads level-0 tiles of 256 px only (the benchmark's setting)")
    n = len(pdf)
    decoder = TileDecoder(DecodeConfig(encoding=a.encoding, reader=a.reader))
    rows = decoder.rows_per_batch(256, 256)

    def decode(df: pd.DataFrame) -> int:  # batch by batch, as the workers do; returns failed tiles
        failed = 0
        for start in range(0, len(df), rows):
            d = decoder.decode({c: v.to_numpy() for c, v in df.iloc[start:start + rows].items()})
            failed += sum(e is not None for e in d.errors)
        return failed

    decode(pdf.iloc[:50])  # open handles, warm caches
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    failed = decode(pdf)
    prof.disable()
    wall = time.perf_counter() - t
    print(f"{n} tiles, reader={a.reader}, encoding={a.encoding}: {wall / n * 1000:.2f} ms/tile "
          f"({n / wall:.0f} tiles/s on one core, under cProfile; {failed} failed)")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    print(s.getvalue())
    return {"tiles": n, "ms_per_tile": wall / n * 1000, "decoded": n - failed, "failed": failed}


if __name__ == "__main__":
    main()
