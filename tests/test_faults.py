"""Distributed faults on ``local-cluster[2,1,1024]`` (two real executor JVMs), injected from
outside the pipeline by ``tests/fault_run.py``: an executor killed mid-decode, the driver killed
before the tiles commit; with each Delta writer (delta-rs, and Spark's with the Delta Lake jars).
Tables are read back with polars and delta-rs (not our reader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import CMU, delta_jars, make_tiff, need
from deltalake import DeltaTable

from slidelake.config import PipelineConfig
from slidelake.pipeline import run_all

HERE = Path(__file__).resolve().parent
MASTER = "local-cluster[2,1,1024]"


WRITERS = ["delta-rs", "spark"]


def _run(lake: Path, slide: Path, fault: str, writer: str = "delta-rs") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    env.pop("SLIDELAKE_DELTA_JARS", None)
    if writer == "spark":
        env["SLIDELAKE_DELTA_JARS"] = str(delta_jars())
    return subprocess.run([sys.executable, str(HERE / "fault_run.py"), str(lake), str(slide), MASTER, fault, writer],
                          capture_output=True, text=True, timeout=600, env=env)


def _result(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no result ({proc.returncode}):\n{proc.stderr[-4000:]}")


def _cfg(lake: Path, slide: Path) -> PipelineConfig:
    # the configuration of tests/fault_run.py, so tile ids and bytes can be compared
    return PipelineConfig.model_validate({
        "inputs": [str(slide)], "lake": str(lake), "resolution": {"level": 0},
        "grid": {"tile_extent": 128, "last": "keep"}, "masks": {"enabled": False},
        "filter": {"max_background_fraction": None}, "decode": {"encoding": "png"},
        "partition": {"tiles_per_partition": 64},
    })


def _tiles(lake: Path) -> pl.DataFrame:
    return pl.read_delta(str(lake / "tiles")).select("slide_id", "tile_id", "tile_x", "tile_y", "tile").sort("tile_id")


@pytest.mark.spark
@pytest.mark.parametrize("writer", WRITERS)
def test_executor_killed_mid_decode_every_tile_exactly_once(spark, tmp_path, writer):
    need(CMU)
    proc = _run(tmp_path / "lake", CMU, "executor", writer)
    res = _result(proc)
    assert res["status"] == "succeeded" and res["log"] and res["log"][0].startswith("killed executor")
    assert res["writer"] == writer
    got = _tiles(tmp_path / "lake")
    run_all(spark, _cfg(tmp_path / "clean", CMU))
    want = _tiles(tmp_path / "clean")
    assert got.height == want.height == 18 * 24 == res["counts"]["tiles_written"]
    assert got["tile_id"].is_duplicated().sum() == 0
    assert got.equals(want)  # same tiles, same bytes
    # counts come from task results: a retried task is counted once
    assert res["counts"]["tiles_decoded"] == res["counts"]["tiles_generated"] == 18 * 24
    assert not (tmp_path / "lake" / "tiles" / "_staging").exists()


@pytest.mark.spark
@pytest.mark.parametrize("writer", WRITERS)
def test_driver_killed_before_commit_leaves_table_then_rerun_completes(spark, tmp_path, writer):
    need(CMU)
    lake = tmp_path / "lake"
    other = tmp_path / "other.tiff"
    make_tiff(other, 300, 200, mpp=0.5, seed=5)
    run_all(spark, _cfg(lake, other))
    before_version = DeltaTable(str(lake / "tiles")).version()
    before = _tiles(lake)

    proc = _run(lake, CMU, "driver", writer)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, mid-run
    assert DeltaTable(str(lake / "tiles")).version() == before_version
    assert _tiles(lake).equals(before)

    # the killed run's staged files are not in the table; once stale they are cleaned up
    left = list((lake / "tiles" / "_staging").iterdir())
    assert len(left) == 1 and any(left[0].rglob("*.parquet"))
    for f in [left[0], *left[0].rglob("*")]:
        os.utime(f, (1e9, 1e9))

    if writer == "spark":
        res = _result(_run(lake, CMU, "none", writer))
        assert res["status"] == "succeeded" and res["writer"] == "spark" and res["counts"]["tiles_written"] == 18 * 24
    else:
        rec = run_all(spark, _cfg(lake, CMU))
        assert rec.status == "succeeded" and rec.counts["tiles_written"] == 18 * 24
    t = _tiles(lake)
    assert t.height == before.height + 18 * 24 and t["tile_id"].is_duplicated().sum() == 0
    assert not (lake / "tiles" / "_staging").exists()
