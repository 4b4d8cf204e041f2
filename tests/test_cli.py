"""The CLI in-process (shares the test Spark session) and the spark-submit entry point."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import CMU, ROOT, need
from slidelake.cli import app

pytestmark = pytest.mark.spark


def test_cli_run_then_sql(spark, lake):
    need(CMU)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(CMU), "--lake", str(lake), "-c", str(ROOT / "conf" / "default.yaml"),
                              "--tile-extent", "512", "--encoding", "png", "--profile", "--progress"])
    assert res.exit_code == 0, res.output
    assert "succeeded" in res.output and str(lake / "tiles") in res.output
    runs = pl.read_delta(str(lake / "runs"))
    prof = runs["profile"][0]
    assert prof["decode.tiles"] == prof["tiles.generated"] - runs["tiles_skipped"][0] > 0
    assert prof["decode.tiles_native"] == prof["decode.tiles"]  # the SVS is read natively
    assert 0 < prof["decode.encode_s"] < prof["decode.batch_s"] and prof["overlap.tiles"] == prof["tiles.generated"]
    assert prof["masks.slides"] == 1 and prof["masks.s"] > 0
    # each stage's worker peak resident set (a Python worker with NumPy and pandas: > 50 MiB);
    # a single slide's mask is made on the driver (masks.on_driver_below), by no worker
    for stage in ("overlap", "decode"):
        assert 50 < prof[f"{stage}.worker_peak_mib"] < 4096, stage
    assert "masks.worker_peak_mib" not in prof
    # the driver's commit of the workers' files: their number and bytes are the table's
    from deltalake import DeltaTable

    files = DeltaTable(str(lake / "tiles")).file_uris()
    assert prof["write.files"] == len(files) > 0 and prof["write.commit_s"] > 0
    assert prof["write.bytes"] == sum(os.path.getsize(f.removeprefix("file://")) for f in files)
    assert "decode.read_s" in res.output  # the profile table is printed
    t = pl.read_delta(str(lake / "tiles"))
    assert t.height > 0 and set(t["tile_format"]) == {"png"} and set(t["tile_width"]) == {512}
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM tiles", "--lake", str(lake)])
    assert res.exit_code == 0, res.output
    assert str(t.height) in res.output
    res = runner.invoke(app, ["sql", "SELECT status, tiles_written FROM runs", "--lake", str(lake)])
    assert "succeeded" in res.output and str(t.height) in res.output
    # the same command again is incremental; --force redoes the slide
    args = ["run", str(CMU), "--lake", str(lake), "-c", str(ROOT / "conf" / "default.yaml"),
            "--tile-extent", "512", "--encoding", "png", "--no-progress"]
    res = runner.invoke(app, args)
    out = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 0 and "1 unchanged since the last scan" in out
    assert "already tiled with this config, skipped: 1" in out and "0 written from 0 slide(s)" in out
    res = runner.invoke(app, args + ["--force"])
    assert res.exit_code == 0 and f"{t.height} written from 1 slide(s)" in " ".join(res.output.split())
    assert pl.read_delta(str(lake / "tiles")).height == t.height


def test_cli_discover_then_masks(spark, lake):
    need(CMU)
    runner = CliRunner()
    assert runner.invoke(app, ["discover", str(CMU), "--lake", str(lake)]).exit_code == 0
    res = runner.invoke(app, ["masks", "--lake", str(lake), "--mask-mpp", "4"])
    assert res.exit_code == 0, res.output
    assert "1 computed" in res.output and str(lake / "masks") in res.output
    m = pl.read_delta(str(lake / "masks"))
    assert m["status"].to_list() == ["ok"] and m["mask_mpp_x"][0] == pytest.approx(4.0, rel=0.01)
    assert Path(m["qc_path"][0]).is_file() and Path(m["mask_path"][0]).is_file()
    res = runner.invoke(app, ["masks", "--lake", str(lake), "--mask-mpp", "4"])
    assert "0 computed, 1 reused" in res.output


def test_cli_rejects_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  last: sideways\n")
    res = CliRunner().invoke(app, ["run", "x.svs", "-c", str(bad)])
    assert res.exit_code == 2 and "last" in res.output


def test_spark_submit_entry_point(tmp_path):
    need(CMU)
    spark_submit = Path(sys.executable).parent / "spark-submit"
    if not spark_submit.exists():
        pytest.skip("spark-submit not installed next to this Python")
    lake = tmp_path / "lake"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    for job in ("discover_slides.py", "tile_slides.py"):
        out = subprocess.run(
            [str(spark_submit), "--master", "local[1]", str(ROOT / "jobs" / job), "--lake", str(lake),
             "--config", str(ROOT / "conf" / "default.yaml"), str(CMU)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout
    runs = pl.read_delta(str(lake / "runs"))
    assert sorted(runs["job"]) == ["discover", "run"]
    assert set(runs["spark_master"]) == {"local[1]"}
    assert pl.read_delta(str(lake / "tiles")).height > 0


def test_a_single_flag_keeps_the_default_config(spark, tmp_path):
    """``--assumed-mpp`` without ``-c`` merges into the default config (its mpp request stays)."""
    from conftest import make_tiff

    make_tiff(tmp_path / "no-mpp.tiff", 300, 200, mpp=None)
    lake = tmp_path / "lake"
    res = CliRunner().invoke(app, ["discover", str(tmp_path / "no-mpp.tiff"), "--lake", str(lake), "--assumed-mpp", "0.5"])
    assert res.exit_code == 0, res.output
    row = pl.read_delta(str(lake / "slides")).row(0, named=True)
    assert (row["status"], row["mpp_x"], row["mpp_source"]) == ("ok", 0.5, "assumed")


def test_version():
    from slidelake import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"slidelake {__version__}"


def test_help_shows_flags_without_a_metavar():
    out = CliRunner().invoke(app, ["run", "--help"]).output
    assert "--no-masks" in out and "--profile" in out and "--assumed-mpp" in out
    assert "<bool>" not in out and "--mpp <float>" in " ".join(out.split())


def test_a_missing_input_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nowhere" / "slide.svs"
    res = CliRunner().invoke(app, ["run", str(missing), "--lake", str(tmp_path / "lake")])
    assert res.exit_code == 2 and res.output.strip() == f"input not found: {missing}"
    assert not (tmp_path / "lake").exists()  # no runs row: nothing started


def test_sql_names_the_lake_and_its_tables(spark, tmp_path):
    from conftest import make_tiff

    res = CliRunner().invoke(app, ["sql", "SELECT 1", "--lake", str(tmp_path / "empty")])
    assert res.exit_code == 2 and res.output.strip() == f"no tables: {tmp_path / 'empty'} holds no slidelake tables (make them with slidelake run)"
    make_tiff(tmp_path / "s.tiff", 200, 200, mpp=0.5)
    lake = tmp_path / "lake"
    assert CliRunner().invoke(app, ["discover", str(tmp_path / "s.tiff"), "--lake", str(lake)]).exit_code == 0
    for engine, says in (("datafusion", "table 'datafusion.public.tiles' not found"),
                         ("spark", "TABLE_OR_VIEW_NOT_FOUND")):
        res = CliRunner().invoke(app, ["sql", "SELECT * FROM tiles", "--lake", str(lake), "--engine", engine])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], res.output
        assert lines[0].endswith(f"(tables in {lake}: slides, runs)")


QUERIES = [
    "SELECT slide_id, slide_label, patient_id, attributes['stain'] AS stain, count(*) AS n, sum(tile_x) AS sx "
    "FROM tiles GROUP BY slide_id, slide_label, patient_id, attributes['stain']",
    "SELECT s.path, s.width, s.height, s.level_count, count(t.tile_id) AS n FROM slides s "
    "LEFT JOIN tiles t ON s.slide_id = t.slide_id GROUP BY s.path, s.width, s.height, s.level_count",
    "SELECT status, tiles_written, slides_tiled FROM runs",
    "SELECT slide_id, tile_x, tile_y, valid_width, mpp_x FROM tiles WHERE tile_x >= 128 AND tile_y = 0",
]


def test_sql_engines_give_the_same_rows(spark, tmp_path):
    """DataFusion (no Spark, the default on a local lake) and Spark SQL answer the same queries
    with the same rows; CSV and JSON carry full values; a piped table is not cut."""
    import csv
    import io
    import json

    from conftest import make_tiff

    for k in (0, 1):
        make_tiff(tmp_path / f"s{k}.tiff", 384, 256, tile=64, seed=k)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id,stain\n" + "".join(
        f"{tmp_path / f's{k}.tiff'},{'tumor' if k else 'normal'},P{k},HE\n" for k in (0, 1)))
    lake = tmp_path / "lake"
    assert CliRunner().invoke(app, ["run", str(manifest), "--lake", str(lake), "--level", "0", "--tile-extent", "128",
                                    "--no-masks", "--max-background", "1"]).exit_code == 0
    for q in QUERIES:
        got = {}
        for engine in ("datafusion", "spark"):
            res = CliRunner().invoke(app, ["sql", q, "--lake", str(lake), "--engine", engine, "--format", "json",
                                           "--limit", "1000"])
            assert res.exit_code == 0, res.output
            got[engine] = sorted(json.dumps(r, sort_keys=True) for r in json.loads(res.output))
        assert got["datafusion"] == got["spark"] and got["spark"], q
    res = CliRunner().invoke(app, ["sql", QUERIES[0], "--lake", str(lake), "--format", "csv"])
    rows = list(csv.reader(io.StringIO(res.output)))
    assert rows[0] == ["slide_id", "slide_label", "patient_id", "stain", "n", "sx"] and len(rows) == 3
    assert sorted(r[1:5] for r in rows[1:]) == [["normal", "P0", "HE", "6"], ["tumor", "P1", "HE", "6"]]
    long = "x" * 300
    res = CliRunner().invoke(app, ["sql", f"SELECT '{long}' AS v, path FROM slides", "--lake", str(lake)])
    assert long in res.output and "…" not in res.output


def test_runs_that_do_nothing_say_so(spark, tmp_path):
    """An empty folder warns (exit 0); ``tile`` before ``discover`` names the command (exit 2);
    every slide failing resolution exits 4."""
    from conftest import make_tiff

    lake, empty = tmp_path / "lake", tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["run", str(empty), "--lake", str(lake)])
    assert res.exit_code == 0 and "no slide files found" in res.output
    res = CliRunner().invoke(app, ["tile", "--lake", str(tmp_path / "new-lake")])
    assert res.exit_code == 2 and "run `slidelake discover INPUTS" in res.output
    assert not (tmp_path / "new-lake").exists()
    make_tiff(tmp_path / "no-mpp.tiff", 300, 200, mpp=None)  # an mpp request cannot be met without --assumed-mpp
    res = CliRunner().invoke(app, ["run", str(tmp_path / "no-mpp.tiff"), "--lake", str(lake)])
    assert res.exit_code == 4 and "no slide was tiled" in res.output, res.output


def test_a_cli_run_prints_no_spark_log_lines_unless_verbose(tmp_path):
    """The CLI's own Spark session logs errors only (src/slidelake/log4j2.properties) and the
    JVM's start-up note on its incubator module is left out. ``--verbose`` gives Spark's own
    logs and the JVM's note."""
    need(CMU)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("SLIDELAKE_SPARK_MASTER", None)
    cli = str(Path(sys.executable).parent / "slidelake")
    quiet = subprocess.run([cli, "discover", str(CMU), "--lake", str(tmp_path / "a")], capture_output=True, text=True,
                           env=env, timeout=300)
    assert quiet.returncode == 0 and "succeeded" in quiet.stdout
    assert quiet.stderr.splitlines() == [], quiet.stderr
    loud = subprocess.run([cli, "--verbose", "discover", str(CMU), "--lake", str(tmp_path / "b")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert loud.returncode == 0 and "log4j" in loud.stderr and "WARNING: Using incubator modules" in loud.stderr


def test_a_contradictory_manifest_is_one_line_and_exit_2(spark, tmp_path):
    from conftest import make_tiff

    for k in (0, 1):
        make_tiff(tmp_path / f"s{k}.tiff", 128, 128, seed=k)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,patient_id,split\n{tmp_path / 's0.tiff'},P7,train\n{tmp_path / 's1.tiff'},P7,test\n")
    res = CliRunner().invoke(app, ["discover", str(manifest), "--lake", str(tmp_path / "lake")])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "manifest error: patient P7 is in splits 'train' and 'test' in the manifest (column 'split'): a patient's "
        "slides must share one split"]


def test_config_errors_name_the_flag_without_a_url(tmp_path):
    res = CliRunner().invoke(app, ["run", "x.svs", "--tolerance=-1", "--lake", str(tmp_path / "l")])
    assert res.exit_code == 2 and "http" not in res.output
    assert res.output.strip().splitlines() == [
        "config error: resolution.tolerance (--tolerance): Input should be greater than or equal to 0 (got -1.0)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  last: sideways\nresolution:\n  mpp: 0.5\n  level: 1\n")
    lines = CliRunner().invoke(app, ["run", "x.svs", "-c", str(bad)]).output.strip().splitlines()
    assert lines == ["config error: resolution: resolution: give exactly one of level, mpp, downsample, "
                     "magnification (got ['level', 'mpp'])",
                     "config error: grid.last (--last): Input should be 'keep', 'drop' or 'shift' (got 'sideways')"]


def test_every_stage_shows_its_progress_and_ends_at_its_total(spark, tmp_path):
    """Discovery (files probed), masks (slides masked) and tiling (grid tiles: dropped before
    decode or decoded) each draw a bar whose last line is its fixed total, reached."""
    import re

    from conftest import make_fluorescence_tiff

    make_fluorescence_tiff(tmp_path / "f.tiff", 1536, 1024, radius=400)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "f.tiff"), "--lake", str(tmp_path / "lake"), "--level", "0",
                                   "--progress", "--masks", "--min-tissue", "0.5"])
    assert res.exit_code == 0, res.output
    ends = {what: (int(a), int(b)) for what, a, b in re.findall(r"(files probed|slides masked|grid tiles)\D+(\d+)/(\d+)",
                                                                res.output)}
    assert ends == {"files probed": (1, 1), "slides masked": (1, 1), "grid tiles": (24, 24)}, res.output
