"""Incremental and resumable runs: unchanged slides are neither re-hashed nor re-tiled, changed
ones are, ``force`` redoes them, and a run killed between commits is finished by running it
again, ending exactly as one clean run. Tables are read back with polars / delta-rs."""

from __future__ import annotations

import os

import polars as pl
import pytest
from conftest import make_tiff
from deltalake import DeltaTable

from slidelake.config import PipelineConfig
from slidelake.pipeline import run_all


def _cfg(lake, inputs, **over) -> PipelineConfig:
    base = {"inputs": [str(p) for p in inputs], "lake": str(lake), "resolution": {"level": 0},
            "grid": {"tile_extent": 100, "last": "keep"}, "masks": {"enabled": False},
            "filter": {"max_background_fraction": None}, "decode": {"encoding": "png"}}
    return PipelineConfig.model_validate({**base, **over})


def _tiles(lake) -> pl.DataFrame:
    return pl.read_delta(str(lake / "tiles")).sort(["path", "tile_y", "tile_x"])


@pytest.mark.spark
def test_second_run_skips_unchanged_slides_and_redoes_changed_ones(spark, lake, tmp_path):
    a, b = tmp_path / "a.tiff", tmp_path / "b.tiff"
    make_tiff(a, 300, 200, mpp=0.5, seed=1)
    make_tiff(b, 250, 150, mpp=0.5, seed=2)
    cfg = _cfg(lake, [tmp_path])
    r1 = run_all(spark, cfg)
    assert r1.counts["slides_tiled"] == 2 and r1.counts["tiles_written"] == 6 + 6
    v1 = DeltaTable(str(lake / "tiles")).version()

    # nothing changed: no file is hashed again, no slide tiled again, the tiles table untouched
    r2 = run_all(spark, cfg)
    assert r2.status == "succeeded"
    assert r2.counts["slides_unchanged"] == 2 and r2.counts["slides_skipped"] == 2
    assert r2.counts["slides_tiled"] == 0 and r2.counts["tiles_written"] == 0
    assert DeltaTable(str(lake / "tiles")).version() == v1
    assert set(_tiles(lake)["run_id"]) == {r1.run_id}

    # b rewritten with other content (same size class, new mtime): only b is probed and tiled,
    # and the tiles of b's old content are removed
    old_b = _tiles(lake).filter(pl.col("path") == str(b))["slide_id"][0]
    make_tiff(b, 250, 150, mpp=0.5, seed=3)
    os.utime(b, (1e9, 1e9))
    r3 = run_all(spark, cfg)
    assert r3.counts["slides_unchanged"] == 1 and r3.counts["slides_skipped"] == 1 and r3.counts["slides_tiled"] == 1
    t = _tiles(lake)
    assert t.height == 12 and old_b not in set(t["slide_id"])
    assert set(t.filter(pl.col("path") == str(b))["run_id"]) == {r3.run_id}
    assert set(t.filter(pl.col("path") == str(a))["run_id"]) == {r1.run_id}

    # another tiling config is not "already tiled"
    r4 = run_all(spark, _cfg(lake, [a], grid={"tile_extent": 150, "last": "keep"}, tables={"tiles_table": "t150"}))
    assert r4.counts["slides_skipped"] == 0 and r4.counts["tiles_written"] == 2 * 2

    # --force re-probes and re-tiles the given slide; the table ends with one copy of each tile
    r5 = run_all(spark, _cfg(lake, [a]), force=True)
    assert r5.counts["slides_unchanged"] == 0 and r5.counts["slides_tiled"] == 1 and r5.counts["tiles_written"] == 6
    t = _tiles(lake)
    assert t.height == 12 and t.select("slide_id", "tile_x", "tile_y").is_duplicated().sum() == 0
    assert set(t.filter(pl.col("path") == str(a))["run_id"]) == {r5.run_id}
    rs = pl.read_delta(str(lake / "run_slides"))
    assert set(rs["run_id"]) == {r1.run_id, r3.run_id, r4.run_id, r5.run_id}


@pytest.mark.spark
def test_run_killed_between_commits_is_finished_by_running_it_again(spark, lake, tmp_path, monkeypatch):
    import slidelake.pipeline as pipeline

    slides = []
    for i in range(3):
        p = tmp_path / f"s{i}.tiff"
        make_tiff(p, 220, 160, mpp=0.5, seed=10 + i)
        slides.append(p)
    cfg = _cfg(lake, slides, tables={"slides_per_commit": 1})

    real = pipeline.write_tiles
    calls = {"n": 0}

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("driver killed")  # as a kill between two commits
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_tiles", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_all(spark, cfg)
    monkeypatch.setattr(pipeline, "write_tiles", real)
    partial = _tiles(lake)
    assert partial["slide_id"].n_unique() == 1 and partial.height == 6  # the first batch is committed
    runs = pl.read_delta(str(lake / "runs"))
    assert runs["status"].to_list() == ["failed"]

    again = run_all(spark, cfg)
    assert again.status == "succeeded"
    assert again.counts["slides_skipped"] == 1 and again.counts["slides_tiled"] == 2
    done = _tiles(lake)

    clean_lake = tmp_path / "clean"
    run_all(spark, cfg.model_copy(update={"lake": str(clean_lake)}))
    clean = _tiles(clean_lake)
    cols = ["slide_id", "tile_id", "tile_x", "tile_y", "tile"]
    assert done.height == clean.height == 18
    assert done.select(cols).sort(["slide_id", "tile_y", "tile_x"]).equals(clean.select(cols).sort(["slide_id", "tile_y", "tile_x"]))


@pytest.mark.spark
def test_two_runs_writing_the_same_tables_at_the_same_time(spark, lake, tmp_path):
    """Two runs on disjoint folders commit to the same lake concurrently: both succeed, every
    table holds both runs' rows once, and the Delta logs stay readable."""
    import threading

    folders = []
    for k in range(2):
        d = tmp_path / f"in{k}"
        d.mkdir()
        for i in range(2):
            make_tiff(d / f"s{i}.tiff", 260, 180, mpp=0.5, seed=100 * k + i)
        folders.append(d)
    recs, errors = {}, []

    def go(k):
        try:
            recs[k] = run_all(spark, _cfg(lake, [folders[k]], tables={"slides_per_commit": 1}))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {r.status for r in recs.values()} == {"succeeded"}
    slides = pl.read_delta(str(lake / "slides"))
    assert slides.height == 4 and slides["path"].n_unique() == 4
    t = _tiles(lake)
    assert t["slide_id"].n_unique() == 4 and t.height == 4 * 3 * 2
    assert t.select("slide_id", "tile_x", "tile_y").is_duplicated().sum() == 0
    assert pl.read_delta(str(lake / "runs")).height == 2
    assert pl.read_delta(str(lake / "run_slides")).height == 4


@pytest.mark.spark
def test_paths_stored_relative_to_path_root(spark, lake, tmp_path):
    archive = tmp_path / "archive" / "patient-named-folder"
    archive.mkdir(parents=True)
    make_tiff(archive / "s.tiff", 300, 200, mpp=0.5, seed=4)
    outside = tmp_path / "elsewhere.tiff"
    make_tiff(outside, 200, 200, mpp=0.5, seed=6)
    cfg = _cfg(lake, [archive, outside], tables={"path_root": str(tmp_path / "archive")})
    rec = run_all(spark, cfg)
    assert rec.status == "succeeded" and rec.counts["tiles_written"] == 6 + 4
    rel = "patient-named-folder/s.tiff"
    assert set(pl.read_delta(str(lake / "slides"))["path"]) == {rel, str(outside)}
    assert set(_tiles(lake)["path"]) == {rel, str(outside)}
    assert set(pl.read_delta(str(lake / "run_slides"))["path"]) == {rel, str(outside)}
    runs = pl.read_delta(str(lake / "runs"))
    assert {c["path"] for c in runs["slide_counts"][0]} == {rel, str(outside)}
    # the stored paths resolve again: a tile job on the table's slides and an incremental rerun work
    from slidelake.pipeline import run_tile

    again = run_tile(spark, cfg.model_copy(update={"inputs": []}), force=True)
    assert again.status == "succeeded" and again.counts["tiles_written"] == 10
    rerun = run_all(spark, cfg)
    assert rerun.counts["slides_unchanged"] == 2 and rerun.counts["slides_skipped"] == 2


_WRITER = r"""
import os
import sys
import time

from pyspark.sql import types as T
from slidelake.lake import Lake

path, owner = sys.argv[1], sys.argv[2]
root = sys.argv[3] if len(sys.argv) > 3 else os.path.dirname(path)  # a folder or an s3:// lake
open(f"{path}.ready.{owner}", "w").close()  # imports done; start together
while not os.path.exists(f"{path}.go"):
    time.sleep(0.01)
schema = T.StructType([T.StructField("owner", T.StringType()), T.StructField("k", T.LongType()),
                       T.StructField("round", T.LongType())])
lake = Lake(None, root)  # the table is <lake>/runs
for k in range(8):  # appends
    lake.write_rows("runs", [{"owner": owner, "k": k, "round": 0}], schema, mode="append")
for r in range(1, 5):  # replace this owner's rows only, as a run replaces the rows of its slides
    lake.write_rows("runs", [{"owner": owner, "k": k, "round": r} for k in range(8)], schema,
                    mode="overwrite", replace_where=f"owner = '{owner}'")
"""


def concurrent_writers(path: str, root: str | None = None) -> None:
    """Three processes append and replace their own rows of the table ``runs`` of the lake
    ``root`` (default: the folder of ``path``, where they also meet) at the same time."""
    import subprocess
    import sys
    import time

    owners = ["a", "b", "c"]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, o, *([root] if root else [])],
                              stderr=subprocess.PIPE, text=True) for o in owners]
    deadline = time.monotonic() + 120
    while not all(os.path.exists(f"{path}.ready.{o}") for o in owners) and time.monotonic() < deadline:
        time.sleep(0.05)
    open(f"{path}.go", "w").close()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs


def check_concurrent_writes(t: pl.DataFrame, version: int) -> None:
    """No commit of :func:`concurrent_writers` lost, no row duplicated."""
    owners = ["a", "b", "c"]
    t = t.sort("owner", "k")
    assert t.height == 3 * 8 and t.select("owner", "k").is_duplicated().sum() == 0
    assert t["owner"].to_list() == [o for o in owners for _ in range(8)]
    assert set(t["round"]) == {4}  # every owner's last replacement, none lost to another's
    # 3 x (8 appends + 4 replacements) commits, the first one creating the table
    assert version == 3 * 12 - 1


def test_separate_processes_committing_to_one_table(tmp_path):
    """Three processes append and replace their own rows of one Delta table at the same time
    (delta-rs commits, conflicts retried): no commit is lost, no row duplicated, and each
    process's last replacement is what the table holds."""
    from deltalake import DeltaTable

    path = str(tmp_path / "runs")  # the table runs of the lake tmp_path
    concurrent_writers(path)
    check_concurrent_writes(pl.read_delta(path), DeltaTable(path).version())
