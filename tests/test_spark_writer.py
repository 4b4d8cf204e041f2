"""Spark's own Delta writer (the Databricks/EMR path), run through the README's local
``spark-submit`` line with the Delta Lake jars: the same tiles as the delta-rs writer, tables
every Delta reader reads, Spark's engine in the log, reruns that skip and never duplicate.

The jars come from ``jobs/fetch_jars.sh`` (``$SLIDELAKE_DELTA_JARS``); without them these tests
skip with the reason, except under `.ci/run` (``SLIDELAKE_REQUIRE_ALL=1``), where a skip fails.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

from conftest import CMU, delta_jars, need

ROOT = Path(__file__).resolve().parents[1]
DELTA_CONF = ["--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
              "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog"]
# what a tile row is, whichever writer committed it (run_id and created_at differ by run)
SAME = ["slide_id", "tile_id", "path", "level", "downsample", "mpp_x", "tile_x", "tile_y", "level0_x", "level0_y",
        "valid_width", "valid_height", "tile", "tile_format", "tile_std", "tissue_fraction", "config_hash"]


def _jars() -> str:
    folder = delta_jars()
    return ",".join(str(j) for j in sorted(folder.glob("delta-spark_4.2_2.13-*.jar")) + sorted(folder.glob("delta-storage-*.jar")))


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


# ----------------------------------------------------------------- the reliability scenarios

def _delta_rs(cfg):
    return cfg.model_copy(update={"tables": cfg.tables.model_copy(update={"writer": "delta-rs"})})


@pytest.fixture(scope="module")
def scenarios(spark, tmp_path_factory):
    """Runs ``tests/spark_writer_job.py`` once (a session with the Delta jars, Spark's writer) on
    generated folders ``a`` and ``b`` (two 400 x 300 px slides each), a third slide ``c``, a
    corrupt copy of the CMU sample, and a lake the delta-rs writer made from ``a``."""
    need(CMU)
    from conftest import as_older_lake, corrupt_copy, make_tiff
    from slidelake.pipeline import run_all
    from spark_writer_job import cfg

    base = tmp_path_factory.mktemp("spark-writer")
    slides = base / "slides"
    for k, seeds in (("a", (1, 2)), ("b", (3, 4)), ("c", (5,))):
        (slides / k).mkdir(parents=True)
        for seed in seeds:
            make_tiff(slides / k / f"s{seed}.tiff", 400, 300, mpp=0.5, seed=seed)
    import numpy as np
    import tifffile

    tifffile.imwrite(slides / "blank.tiff", np.full((300, 400, 3), 255, np.uint8), tile=(64, 64), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    corrupt = corrupt_copy(CMU, base / "corrupt.svs")
    shared = base / "shared"
    by_rs = run_all(spark, _delta_rs(cfg(shared, [slides / "a"])))
    as_older_lake(shared)  # Spark's writer must add the newer columns (mergeSchema)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SLIDELAKE_DELTA_JARS": str(delta_jars()),
           "SLIDELAKE_SPARK_MASTER": "local[2]", "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "spark_writer_job.py"), str(base / "out"), str(slides),
                           str(corrupt), str(shared)], capture_output=True, text=True, env=env, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return base, json.loads(lines[0].removeprefix("RESULT ")), by_rs


@pytest.mark.spark
def test_spark_writer_reruns_skip_replace_and_refuse_another_config(spark, scenarios):
    from slidelake.pipeline import run_all
    from spark_writer_job import cfg

    base, res, _ = scenarios
    lake = base / "out" / "rerun"
    assert res["first"]["status"] == "succeeded" and res["first"]["writer"] == "spark"
    assert res["first"]["counts"]["tiles_written"] == 2 * 3 * 2  # two 400 x 300 slides, 128 px tiles, drop
    assert res["again"]["counts"]["slides_skipped"] == 2 and res["again"]["counts"]["tiles_written"] == 0
    assert res["forced"]["counts"]["tiles_written"] == 12
    assert res["other_config"].startswith("refused") and "tiles_table" in res["other_config"]
    tiles = pl.read_delta(str(lake / "tiles"))
    assert tiles.height == res["rerun_tiles"] == 12 and tiles["tile_id"].is_duplicated().sum() == 0
    assert set(tiles["run_id"]) == {res["forced"]["run_id"]}  # the forced run replaced the partitions
    runs = pl.read_delta(str(lake / "runs")).sort("started_at")
    assert runs["status"].to_list() == ["succeeded"] * 3 + ["failed"]
    assert all(e.startswith("Apache-Spark/") for e in _engines(lake / "tiles"))
    # the same slides through the delta-rs writer: the same rows
    rs = base / "rs"
    assert run_all(spark, _delta_rs(cfg(rs, [base / "slides" / "a"]))).counts["tiles_written"] == 12
    assert tiles.select(SAME).sort("tile_id").equals(pl.read_delta(str(rs / "tiles")).select(SAME).sort("tile_id"))


@pytest.mark.spark
def test_spark_writer_lists_every_failed_tile(scenarios):
    base, res, _ = scenarios
    lake = base / "out" / "corrupt"
    counts = res["corrupt"]["counts"]
    assert res["corrupt"]["status"] == "succeeded" and counts["tiles_failed"] > 20  # more than a sample
    errs = pl.read_delta(str(lake / "tile_errors"))
    assert errs.height == res["corrupt_errors"] == counts["tiles_failed"]
    failed = set(zip(errs["tile_x"], errs["tile_y"]))
    written = set(zip(*pl.read_delta(str(lake / "tiles")).select("tile_x", "tile_y")))
    assert len(failed) == errs.height and not failed & written
    assert len(failed | written) == counts["tiles_generated"] == counts["tiles_decoded"]


@pytest.mark.spark
def test_spark_writer_commits_a_batch_with_no_kept_tile(scenarios):
    base, res, _ = scenarios
    blank = res["blank"]
    assert blank["status"] == "succeeded" and blank["counts"]["tiles_decoded"] == 6
    assert blank["counts"]["tiles_filtered"] == 6 and blank["counts"]["tiles_written"] == 0
    assert res["blank_tiles"] == pl.read_delta(str(base / "out" / "blank" / "tiles")).height == 0


@pytest.mark.spark
def test_spark_writer_concurrent_runs_keep_a_consistent_log(scenarios):
    base, res, _ = scenarios
    lake = base / "out" / "concurrent"
    assert res["concurrent_errors"] == []
    assert {r["status"] for r in res["concurrent"].values()} == {"succeeded"}
    slides = pl.read_delta(str(lake / "slides"))
    assert slides.height == 4 and slides["path"].n_unique() == 4
    tiles = pl.read_delta(str(lake / "tiles"))
    assert tiles["slide_id"].n_unique() == 4 and tiles.height == 4 * 6
    assert tiles.select("slide_id", "tile_x", "tile_y").is_duplicated().sum() == 0
    assert pl.read_delta(str(lake / "runs")).height == 2 and pl.read_delta(str(lake / "run_slides")).height == 4
    for name in ("slides", "tiles", "runs"):  # every version of each log reads back
        from deltalake import DeltaTable

        dt = DeltaTable(str(lake / name))
        assert [h["version"] for h in dt.history()] == list(range(dt.version(), -1, -1))


@pytest.mark.spark
def test_tables_of_one_writer_are_appended_to_by_the_other(spark, scenarios):
    from deltalake import DeltaTable

    from slidelake.pipeline import run_all
    from spark_writer_job import cfg

    base, res, by_rs = scenarios
    shared = base / "shared"  # delta-rs first (folder a), then Spark's writer (folder b)
    assert by_rs.delta_writer == "delta-rs" and res["shared"]["writer"] == "spark"
    tiles = pl.read_delta(str(shared / "tiles"))
    assert tiles.height == res["shared_tiles"] == 24 and tiles["slide_id"].n_unique() == 4
    # the lake predated the typed manifest columns; Spark's writer added them
    assert {"slide_label", "patient_id", "split"} <= set(tiles.columns)
    assert "split" in pl.read_delta(str(shared / "slides")).columns
    engines = _engines(shared / "tiles")
    assert any(e.startswith("Apache-Spark/") for e in engines) and any("delta-rs" in e for e in engines), engines
    # and delta-rs appends to the lake Spark's writer made (folder b next to a)
    lake = base / "out" / "rerun"
    rec = run_all(spark, _delta_rs(cfg(lake, [base / "slides" / "b"])))
    assert rec.status == "succeeded" and rec.counts["tiles_written"] == 12
    assert pl.read_delta(str(lake / "tiles")).height == DeltaTable(str(lake / "tiles")).to_pyarrow_table().num_rows == 24


def _s3_jars() -> str:
    """hadoop-aws, the AWS SDK bundle and the S3 analytics accelerator (``jobs/fetch_jars.sh s3``),
    ``:``-separated for ``--driver-class-path`` (a local master: no copy of the 690 MB bundle
    per session)."""
    folder = delta_jars()
    jars = [j for name in ("hadoop-aws-*.jar", "bundle-*.jar", "analyticsaccelerator-s3-*.jar")
            for j in sorted(folder.glob(name))]
    if len(jars) < 3:
        pytest.skip(f"Hadoop's S3A jars absent (run jobs/fetch_jars.sh s3): {folder}")
    return ":".join(str(j) for j in jars)


@pytest.mark.slides
def test_spark_writer_makes_a_lake_in_a_bucket(spark, s3_server, tmp_path):
    """The EMR recipe on a real S3-compatible server: ``spark-submit`` with the Delta jars and
    Hadoop's S3A, ``conf/emr.yaml`` with the server's endpoint, the slide in the bucket and
    ``--lake s3a://...``. Every table is committed by Spark's Delta writer into the bucket
    (tile files staged there by the workers), delta-rs reads the same tiles the delta-rs writer
    makes from the file on disk, and a rerun skips."""
    need(CMU)
    from slidelake.config import load_config
    from slidelake.pipeline import run_all

    conf = tmp_path / "s3.yaml"
    conf.write_text((ROOT / "conf" / "emr.yaml").read_text().replace(
        "endpoint: null", "endpoint: http://127.0.0.1:8333").replace("region: null", "region: us-east-1"))
    slide = f"s3://lakes/spark-writer-slides/{CMU.name}"
    with _s3_fs(s3_server).open_output_stream(slide.removeprefix("s3://")) as f:
        f.write(CMU.read_bytes())
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, **s3_server}
    env.pop("SLIDELAKE_SPARK_MASTER", None)
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--jars", _jars(),
           "--driver-class-path", _s3_jars(), *DELTA_CONF, str(ROOT / "jobs" / "tile_slides.py"),
           "--config", str(conf), "--lake", "s3a://lakes/spark-writer", slide]
    # without the S3 analytics accelerator Hadoop's S3A cannot start: one line before any work
    partial = [*cmd[:6], _s3_jars().rsplit(":", 1)[0], *cmd[7:-2], "s3a://lakes/no-accelerator", str(CMU)]
    proc = subprocess.run(partial, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "storage error: Spark cannot open s3a://lakes/no-accelerator: java.lang.NoClassDefFoundError" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _s3_fs(s3_server).get_file_info(pafs.FileSelector("lakes/no-accelerator", allow_not_found=True)) == []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    opts = {k.lower(): v for k, v in s3_server.items()}
    uri = "s3://lakes/spark-writer"
    for name in ("slides", "masks", "tiles", "tile_errors", "run_slides", "runs"):
        assert pl.read_delta(f"{uri}/{name}", storage_options=opts).height >= 0, name
        log = pl.read_ndjson(_read_s3(f"{uri}/{name}/_delta_log/00000000000000000000.json", s3_server))
        assert any(str(e).startswith("Apache-Spark/") for e in log["commitInfo"].struct.field("engineInfo")
                   if e is not None), name
    by_spark = pl.read_delta(f"{uri}/tiles", storage_options=opts)
    other = tmp_path / "delta-rs-lake"
    rec = run_all(spark, load_config(ROOT / "conf" / "default.yaml", {"inputs": [str(CMU)], "lake": str(other)}))
    by_rs = pl.read_delta(str(other / "tiles"))
    assert by_spark.height == by_rs.height == rec.counts["tiles_written"] > 0
    same = [c for c in SAME if c != "path"]  # the URI of the object, the path of the file
    assert by_spark.select(same).sort("tile_id").equals(by_rs.select(same).sort("tile_id"))
    assert set(by_spark["path"]) == {slide}
    masks = pl.read_delta(f"{uri}/masks", storage_options=opts)
    assert masks["mask_path"][0].startswith("s3a://lakes/spark-writer/overlays/")
    secret = s3_server["AWS_SECRET_ACCESS_KEY"]
    assert secret not in proc.stdout and secret not in proc.stderr

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert again.returncode == 0 and "skipped: 1" in again.stdout, again.stderr[-4000:]
    assert pl.read_delta(f"{uri}/tiles", storage_options=opts).height == by_spark.height
    assert pl.read_delta(f"{uri}/runs", storage_options=opts)["delta_writer"].to_list() == ["spark", "spark"]


def _s3_fs(env: dict) -> pafs.S3FileSystem:
    """pyarrow's S3 file system on the test server with the keys of ``env``."""
    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override="127.0.0.1:8333", scheme="http", region="us-east-1")


def _read_s3(uri: str, env: dict) -> io.BytesIO:
    """The object ``uri`` (``s3://bucket/key``) read whole from the test server."""
    with _s3_fs(env).open_input_stream(uri.removeprefix("s3://")) as f:
        return io.BytesIO(f.read())
