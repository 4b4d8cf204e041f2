"""Tiling from slides and into lakes on a local S3 server, against the same on local disk.

    .venv/bin/python bench/object_storage.py            # the 40,960 x 30,720 benchmark slide
    .venv/bin/python bench/object_storage.py --rounds 3 --slide bench/data/other.svs

Starts SeaweedFS on loopback (``bench/s3_server.py``), uploads the SYNTHETIC benchmark slide
(``bench/make_slide.py``, cached in ``bench/data/``) and runs ``run_all`` in one embedded
Spark session (``local[N]``, masks on, level 0, 256 px JPEG tiles, the delta-rs writer), each
run into a fresh lake, in rounds that alternate the order (this VM drifts between minutes):

* ``disk``: the slide from local disk, the lake on local disk (the reference);
* ``s3 slides, cold``: the slide from the bucket with an empty slide cache (the whole object is
  copied once, fingerprinted on the way);
* ``s3 slides, warm``: the slide from the bucket, its copy already cached (one HEAD request per
  slide and decode batch);
* ``s3 lake``: the slide from disk, every table and file of the lake in the bucket.

Reports wall seconds, tiles written, each case's throughput against ``disk`` in the same round
(median over rounds) and the bytes fetched from the bucket per tile written (the cache's
growth), as JSON (``docs/object_storage.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import s3_server  # noqa: E402

KEYS = {"AWS_ACCESS_KEY_ID": "slidelake-bench", "AWS_SECRET_ACCESS_KEY": "bench-secret-0"}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_run(spark, slide: str, lake: str, cache: Path) -> dict:
    from slidelake.config import PipelineConfig
    from slidelake.pipeline import run_all

    cfg = PipelineConfig.model_validate({
        "inputs": [slide], "lake": lake, "resolution": {"level": 0}, "decode": {"encoding": "jpeg"},
        "tables": {"writer": "delta-rs"}, "storage": {"cache_dir": str(cache)}})
    before = folder_bytes(cache) if cache.exists() else 0
    t0 = time.perf_counter()
    rec = run_all(spark, cfg)
    wall = time.perf_counter() - t0
    assert rec.status == "succeeded", rec.error
    fetched = (folder_bytes(cache) if cache.exists() else 0) - before
    return {"wall_s": wall, "tiles": rec.counts["tiles_written"], "fetched_bytes": fetched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default=str(ROOT / "bench" / "data" / "synthetic-40960x30720.svs"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "object_storage.json"))
    args = ap.parse_args()
    if not os.path.isfile(args.slide):
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "bench" / "make_slide.py"), args.slide], check=True)
    work = Path(tempfile.mkdtemp(prefix="slidelake-s3-bench-"))
    proc, env = s3_server.start(work / "seaweedfs", KEYS, "bench")
    try:
        os.environ.update(env)  # before the JVM starts: its Python workers inherit the keys
        os.environ["SLIDELAKE_SPARK_MASTER"] = f"local[{args.cores}]"
        from slidelake.spark import get_spark
        from slidelake.storage import write_bytes

        name = os.path.basename(args.slide)
        uri = f"s3://bench/slides/{name}"
        write_bytes(uri, Path(args.slide).read_bytes())
        spark = get_spark("slidelake-s3-bench")
        one_run(spark, args.slide, str(work / "warm-up"), work / "cache-warm-up")  # JVM and workers warm
        cases = {
            "disk": lambda k: one_run(spark, args.slide, str(work / f"disk-{k}"), work / "unused"),
            "s3 slides, cold": lambda k: one_run(spark, uri, str(work / f"cold-{k}"), work / f"cache-{k}"),
            "s3 slides, warm": lambda k: one_run(spark, uri, str(work / f"warm-{k}"), work / f"cache-{k}"),
            "s3 lake": lambda k: one_run(spark, args.slide, f"s3://bench/lake-{k}", work / "unused"),
        }
        rounds = []
        for k in range(args.rounds):
            order = list(cases) if k % 2 == 0 else ["disk", "s3 lake", "s3 slides, cold", "s3 slides, warm"]
            rounds.append({c: cases[c](k) for c in order})
            shutil.rmtree(work / f"cache-{k}", ignore_errors=True)
        summary = {}
        for c in cases:
            ratios = [r["disk"]["wall_s"] / r[c]["wall_s"] for r in rounds]
            tiles = rounds[0][c]["tiles"]
            summary[c] = {"wall_s": [round(r[c]["wall_s"], 2) for r in rounds], "tiles": tiles,
                          "throughput_vs_disk": round(statistics.median(ratios), 3),
                          "fetched_bytes_per_tile": round(statistics.median(r[c]["fetched_bytes"] for r in rounds)
                                                          / max(1, tiles))}
        out = {"slide": name, "slide_bytes": os.path.getsize(args.slide), "cores": args.cores,
               "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"), "cases": summary}
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        spark.stop()
    finally:
        s3_server.stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
