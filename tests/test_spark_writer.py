"""Spark's own Delta writer (the Databricks/EMR path), run through the README's local
``spark-submit`` line with the Delta Lake jars: the same tiles as the delta-rs writer, tables
every Delta reader reads, Spark's engine in the log, reruns that skip and never duplicate.

The jars come from ``jobs/fetch_jars.sh`` (``$SLIDELAKE_DELTA_JARS``); without them these tests
skip with the reason, except in CI (``CI=true``), where they must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from conftest import CMU, need

ROOT = Path(__file__).resolve().parents[1]
JARS = Path(os.environ.get("SLIDELAKE_DELTA_JARS", Path.home() / ".cache" / "slidelake" / "jars"))
DELTA_CONF = ["--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
              "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog"]
# what a tile row is, whichever writer committed it (run_id and created_at differ by run)
SAME = ["slide_id", "tile_id", "path", "level", "downsample", "mpp_x", "tile_x", "tile_y", "level0_x", "level0_y",
        "valid_width", "valid_height", "tile", "tile_format", "tile_std", "tissue_fraction", "config_hash"]


def _jars() -> str:
    found = sorted(JARS.glob("delta-spark_4.2_2.13-*.jar")) + sorted(JARS.glob("delta-storage-*.jar"))
    if len(found) < 2:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Delta Lake jars missing in {JARS}: .ci/run fetches them (jobs/fetch_jars.sh)")
        pytest.skip(f"Delta Lake jars absent (run jobs/fetch_jars.sh or set SLIDELAKE_DELTA_JARS): {JARS}")
    return ",".join(str(j) for j in found)


def _spark_submit(lake: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("SLIDELAKE_SPARK_MASTER", None)
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--jars", _jars(), *DELTA_CONF,
           str(ROOT / "jobs" / "tile_slides.py"), "--config", str(ROOT / "conf" / "default.yaml"),
           "--lake", str(lake), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)


def _engines(table: Path) -> set[str]:
    out = set()
    for log in (table / "_delta_log").glob("*.json"):
        for line in log.read_text().splitlines():
            action = json.loads(line)
            if "commitInfo" in action:
                out.add(action["commitInfo"].get("engineInfo", ""))
    return out


@pytest.mark.slides
def test_spark_writer_gives_the_delta_rs_rows_and_reruns_skip(spark, tmp_path):
    need(CMU)
    from slidelake.config import load_config
    from slidelake.pipeline import run_all

    lake = tmp_path / "spark-lake"
    proc = _spark_submit(lake, str(CMU))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "succeeded" in proc.stdout

    # every table was committed by Spark's Delta writer and reads back with delta-rs/polars
    for name in ("slides", "masks", "tiles", "tile_errors", "run_slides", "runs"):
        assert any(e.startswith("Apache-Spark/") and "Delta-Lake/" in e for e in _engines(lake / name)), name
    runs = pl.read_delta(str(lake / "runs"))
    assert runs["delta_writer"].to_list() == ["spark"] and runs["status"].to_list() == ["succeeded"]
    by_spark = pl.read_delta(str(lake / "tiles"))

    # the same slide and config through the delta-rs writer (this session has no Delta jars)
    other = tmp_path / "delta-rs-lake"
    rec = run_all(spark, load_config(ROOT / "conf" / "default.yaml", {"inputs": [str(CMU)], "lake": str(other)}))
    assert rec.status == "succeeded" and rec.delta_writer == "delta-rs"
    by_rs = pl.read_delta(str(other / "tiles"))
    assert by_spark.height == by_rs.height == rec.counts["tiles_written"] > 0
    assert by_spark.select(SAME).sort("tile_id").equals(by_rs.select(SAME).sort("tile_id"))
    assert runs["tiles_written"].to_list() == [rec.counts["tiles_written"]]

    # a rerun skips the slide (incremental, from run_slides) and duplicates nothing
    again = _spark_submit(lake, str(CMU))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "skipped: 1" in again.stdout
    assert pl.read_delta(str(lake / "tiles")).height == by_spark.height
    assert pl.read_delta(str(lake / "runs")).height == 2


@pytest.mark.slides
def test_catalog_tables_have_history_and_time_travel(tmp_path):
    """With ``tables.catalog_database`` the tables are registered by name: SQL reads
    ``pathology.tiles``, ``DESCRIBE HISTORY`` lists each commit, and ``VERSION AS OF`` gives the
    table as the first run left it (a training set pinned to a version)."""
    need(CMU)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("SLIDELAKE_SPARK_MASTER", None)
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--jars", _jars(), *DELTA_CONF,
           str(ROOT / "tests" / "catalog_job.py"), str(tmp_path / "lake"), str(CMU), str(ROOT / "conf" / "default.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("CATALOG-JSON ")]
    out = json.loads(line.removeprefix("CATALOG-JSON "))
    assert out["status"] == ["succeeded", "succeeded"] and out["writer"] == "spark"
    assert out["tables"] == ["masks", "runs", "slides", "tile_errors", "tiles"]
    tiles = pl.read_delta(str(tmp_path / "lake" / "tiles"))
    assert out["tiles"] == tiles.height > 0 and out["runs"] == 2
    # the forced rerun replaced the slide's partition in a second commit; version 0 is the first run's
    assert [v for v, _ in out["history"]] == [1, 0] and {op for _, op in out["history"]} == {"WRITE"}
    assert out["first_version_tiles"] == tiles.height
    assert out["first_run_ids"] == [out["run_ids"][0]] and set(tiles["run_id"]) == {out["run_ids"][1]}
