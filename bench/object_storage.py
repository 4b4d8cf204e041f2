"""Tiling from slides and into lakes on a local S3 server, against the same on local disk.

    .venv/bin/python bench/object_storage.py            # the 40,960 x 30,720 benchmark slide
    .venv/bin/python bench/object_storage.py --rounds 3 --slide bench/data/other.svs

Starts SeaweedFS on loopback (``bench/s3_server.py``), uploads the SYNTHETIC benchmark slide
(``bench/make_slide.py``, cached in ``bench/data/``) and runs ``run_all`` in one embedded
Spark session (``local[N]``, masks on, level 0, 256 px JPEG tiles, the delta-rs writer), each
run into a fresh lake, in rounds that alternate the order (this VM drifts between minutes):

* ``disk``: the slide from local disk, the lake on local disk (the reference);
* ``s3 slides, cold``: the slide from the bucket with an empty slide cache: discovery streams
  the whole object once (its SHA-256 fingerprint) into the cache, where the mask and the tiles
  read it;
* ``s3 slides, warm``: the same with the copy already cached;
* ``s3 lake``: the slide from disk, every table and file of the lake in the bucket;
* ``disk, tile job`` and ``s3 slides, ranged reads``: the tile job alone (``run_tile``, after
  an untimed ``run_discover`` and ``run_masks``) of a slide on disk and of one in the bucket
  (a new key each round, so no worker holds it open) whose cached copy was deleted after the
  masks, as on an executor that did not discover it: its tiles come from the object by ranged
  GETs, one per stored tile (the ratio is against ``disk, tile job``).

Reports wall seconds, tiles written, each case's throughput against ``disk`` in the same round
(median over rounds), and per tile written the bytes fetched from the bucket by the tile
stage's ranged reads (``decode.fetched_bytes`` of ``--profile``) and in all (plus the slide
cache's growth), as JSON (``docs/object_storage.json``).
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


def one_run(spark, slide: str, lake: str, cache: Path, tile_job: bool = False) -> dict:
    """``run_all`` of ``slide`` into ``lake`` with the slide cache ``cache`` (``tile_job``: an
    untimed ``run_discover`` and ``run_masks``, the cache emptied, then ``run_tile``, timed);
    wall seconds, tiles and bytes fetched."""
    from slidelake.config import PipelineConfig
    from slidelake.pipeline import run_all, run_discover, run_masks, run_tile

    cfg = PipelineConfig.model_validate({
        "inputs": [slide], "lake": lake, "resolution": {"level": 0}, "decode": {"encoding": "jpeg"},
        "tables": {"writer": "delta-rs"}, "storage": {"cache_dir": str(cache)}})
    if tile_job:
        run_discover(spark, cfg)
        run_masks(spark, cfg)
        shutil.rmtree(cache, ignore_errors=True)
    before = folder_bytes(cache) if cache.exists() else 0
    t0 = time.perf_counter()
    rec = (run_tile if tile_job else run_all)(spark, cfg, profile=True)
    wall = time.perf_counter() - t0
    assert rec.status == "succeeded", rec.error
    ranged = int(rec.profile.get("decode.fetched_bytes", 0))
    copied = (folder_bytes(cache) if cache.exists() else 0) - before
    return {"wall_s": wall, "tiles": rec.counts["tiles_written"], "ranged_bytes": ranged,
            "fetched_bytes": ranged + copied}


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

        def upload(prefix: str) -> str:
            write_bytes(f"s3://bench/{prefix}/{name}", Path(args.slide).read_bytes())
            return f"s3://bench/{prefix}/{name}"

        uri = upload("slides")
        spark = get_spark("slidelake-s3-bench")
        one_run(spark, args.slide, str(work / "warm-up"), work / "cache-warm-up")  # JVM and workers warm
        cases = {
            "disk": lambda k: one_run(spark, args.slide, str(work / f"disk-{k}"), work / "unused"),
            "s3 slides, cold": lambda k: one_run(spark, uri, str(work / f"cold-{k}"), work / f"cache-{k}"),
            "s3 slides, warm": lambda k: one_run(spark, uri, str(work / f"warm-{k}"), work / f"cache-{k}"),
            "s3 lake": lambda k: one_run(spark, args.slide, f"s3://bench/lake-{k}", work / "unused"),
            "disk, tile job": lambda k: one_run(spark, args.slide, str(work / f"disk-tiles-{k}"), work / "unused", True),
            "s3 slides, ranged reads": lambda k: one_run(spark, upload(f"ranged-{k}"), str(work / f"ranged-{k}"),
                                                         work / f"ranged-cache-{k}", True),
        }
        reference = {c: "disk, tile job" if c == "s3 slides, ranged reads" else "disk" for c in cases}
        rounds = []
        for k in range(args.rounds):  # the order alternates where the cases do not depend on each other
            order = list(cases) if k % 2 == 0 else ["s3 lake", "s3 slides, cold", "s3 slides, warm", "disk",
                                                     "s3 slides, ranged reads", "disk, tile job"]
            rounds.append({c: cases[c](k) for c in order})
            shutil.rmtree(work / f"cache-{k}", ignore_errors=True)
        summary = {}
        for c in cases:
            ratios = [r[reference[c]]["wall_s"] / r[c]["wall_s"] for r in rounds]
            tiles = rounds[0][c]["tiles"]
            summary[c] = {"wall_s": [round(r[c]["wall_s"], 2) for r in rounds], "tiles": tiles,
                          "throughput_vs_disk": round(statistics.median(ratios), 3), "against": reference[c],
                          **{f"{key}_per_tile": round(statistics.median(r[c][key] for r in rounds) / max(1, tiles))
                             for key in ("ranged_bytes", "fetched_bytes")}}
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
