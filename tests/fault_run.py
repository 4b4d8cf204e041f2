"""Subprocess entry of tests/test_faults.py: one ``run_all`` on a real multi-JVM Spark master,
with a fault injected from outside the pipeline once the workers have started writing tiles.

    python tests/fault_run.py LAKE SLIDE MASTER {executor|driver|server|none} [delta-rs|spark]

LAKE is a folder or an ``s3://`` URI (reached with the AWS environment variables).
``executor``: SIGKILL one executor JVM (``CoarseGrainedExecutorBackend``) mid-decode; Spark must
retry its tasks. ``driver``: SIGKILL this process (the driver) before the tiles commit.
``server``: SIGKILL the S3 server (``weed mini``) holding the lake, mid-run.
The last argument is the Delta writer (``spark`` needs ``SLIDELAKE_DELTA_JARS``, which the
session then loads). Prints ``RESULT <json>`` with the run's counts when the run ends.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _staged(lake: str) -> bool:
    """True once a worker has written a tile file into the staging folder (or prefix)."""
    import pyarrow.fs as pafs

    from slidelake.storage import filesystem, join

    fs, staging = filesystem(join(lake, "tiles", "_staging"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(staging, recursive=True, allow_not_found=True))
    except OSError:
        return False
    return any(i.path.endswith(".parquet") for i in infos)


def _pids(*words: bytes) -> list[int]:
    """Processes whose command line holds every one of ``words``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and all(w in (d / "cmdline").read_bytes() for w in words):
                pids.append(int(d.name))
        except OSError:
            continue
    return sorted(pids)


def _inject(lake: str, fault: str, log: list[str]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not _staged(lake):
        time.sleep(0.02)
    if fault == "executor":
        pids = _pids(b"CoarseGrainedExecutorBackend")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            log.append(f"killed executor {pids[0]}")
    elif fault == "server":
        for pid in _pids(b"weed", b"mini"):
            os.kill(pid, signal.SIGKILL)
    elif fault == "driver":
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    lake, slide, master, fault = sys.argv[1:5]
    writer = sys.argv[5] if len(sys.argv) > 5 else "delta-rs"
    os.environ["SLIDELAKE_SPARK_MASTER"] = master
    from slidelake.config import PipelineConfig
    from slidelake.pipeline import run_all
    from slidelake.spark import get_spark

    spark = get_spark("slidelake-faults")
    cfg = PipelineConfig.model_validate({
        "inputs": [slide], "lake": lake, "resolution": {"level": 0},
        "grid": {"tile_extent": 128, "last": "keep"}, "masks": {"enabled": False},
        "filter": {"max_background_fraction": None}, "decode": {"encoding": "png"},
        "partition": {"tiles_per_partition": 64}, "tables": {"writer": writer},
    })
    log: list[str] = []
    if fault != "none":
        threading.Thread(target=_inject, args=(lake, fault, log), daemon=True).start()
    rec = run_all(spark, cfg)
    print("RESULT " + json.dumps({"counts": rec.counts, "log": log, "status": rec.status,
                                  "writer": rec.delta_writer}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
