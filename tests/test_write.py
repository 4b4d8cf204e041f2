"""The write stage: Python workers write the tile Parquet files, the driver commits exactly the
files the task results list (delta-rs), every failed tile is reported with its coordinates."""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import openslide
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import make_tiff
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from slidelake.config import DecodeConfig, FilterConfig
from slidelake.decode import rgba_to_rgb
from slidelake.encoding import decode_tile
from slidelake.filtering import keep_mask
from slidelake.write import TILES_COLUMNS, Lineage, make_file_sink, tiles_schema

LINEAGE = Lineage("run-1", "cfg-1", "0.test", datetime(2026, 11, 21, 12, 30, 0))


def _rows(path: str, slide_id: str, width: int, height: int, tile: int = 256) -> pd.DataFrame:
    xs, ys = np.meshgrid(np.arange(0, width, tile), np.arange(0, height, tile))
    x, y = xs.ravel(), ys.ravel()
    n = x.size
    return pd.DataFrame({
        "slide_id": slide_id, "tile_id": np.arange(n, dtype=np.int64), "path": path, "fingerprint": "f",
        "level": np.int32(0), "level_downsample": 1.0, "downsample": 1.0, "mpp_x": 0.5, "mpp_y": 0.5,
        "mpp_source": "tiff", "tile_x": x, "tile_y": y, "tile_col": (x // tile).astype(np.int64),
        "tile_row": (y // tile).astype(np.int64), "level0_x": x, "level0_y": y, "tile_extent_x": np.int32(tile),
        "tile_extent_y": np.int32(tile), "stride_x": np.int32(tile), "stride_y": np.int32(tile),
        "valid_width": np.minimum(tile, width - x).astype(np.int32),
        "valid_height": np.minimum(tile, height - y).astype(np.int32),
        "read_width": np.int32(tile), "read_height": np.int32(tile), "tissue_fraction": 1.0,
        "overlay_fractions": [{"255": 1.0}] * n, "overlay_path": None, "class_fractions": [{}] * n,
        "annotated_fraction": None, "label": None, "annotations_path": None, "attributes": [{"stain": "HE"}] * n,
        "slide_label": "tumor", "patient_id": "P1", "split": "train", "overlap_error": None,
    })


def _pre_schema() -> T.StructType:
    """Schema of the tile rows entering the decode stage (as Spark sends them)."""
    f = T.StructField
    pre = T.StructType([
        f("slide_id", T.StringType()), f("tile_id", T.LongType()), f("path", T.StringType()),
        f("fingerprint", T.StringType()), f("level", T.IntegerType()), f("level_downsample", T.DoubleType()),
        f("downsample", T.DoubleType()), f("mpp_x", T.DoubleType()), f("mpp_y", T.DoubleType()),
        f("mpp_source", T.StringType()), f("tile_x", T.LongType()), f("tile_y", T.LongType()),
        f("tile_col", T.LongType()), f("tile_row", T.LongType()), f("level0_x", T.LongType()),
        f("level0_y", T.LongType()), f("tile_extent_x", T.IntegerType()), f("tile_extent_y", T.IntegerType()),
        f("stride_x", T.IntegerType()), f("stride_y", T.IntegerType()), f("valid_width", T.IntegerType()),
        f("valid_height", T.IntegerType()), f("read_width", T.IntegerType()), f("read_height", T.IntegerType()),
        f("tissue_fraction", T.DoubleType()),
        f("overlay_fractions", T.MapType(T.StringType(), T.DoubleType())), f("overlay_path", T.StringType()),
        f("class_fractions", T.MapType(T.StringType(), T.DoubleType())), f("annotated_fraction", T.DoubleType()),
        f("label", T.StringType()), f("annotations_path", T.StringType()),
        f("attributes", T.MapType(T.StringType(), T.StringType())), f("slide_label", T.StringType()),
        f("patient_id", T.StringType()), f("split", T.StringType()),
    ])
    return pre


def _schema() -> T.StructType:
    return tiles_schema(_pre_schema())


def _run_sink(sink, frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Feed pandas frames to the ``mapInArrow`` sink as Spark would (Arrow record batches of the
    input schema plus ``overlap_error``) and return its result rows."""
    pre = T.StructType(_pre_schema().fields + [T.StructField("overlap_error", T.StringType())])
    schema = to_arrow_schema(pre, timezone="UTC")
    batches = [pa.RecordBatch.from_pandas(df[pre.fieldNames()], schema=schema, preserve_index=False) for df in frames]
    return pa.Table.from_batches(list(sink(iter(batches)))).to_pandas()


def test_file_sink_writes_kept_tiles_and_reports_every_failure(tmp_path):
    good = tmp_path / "good.tiff"
    make_tiff(good, 1000, 700, levels=1, tile=128, compression="jpeg")
    a = _rows(str(good), "a", 1000, 700)  # 4 x 3 = 12 tiles, the right and bottom ones partial
    b = _rows(str(tmp_path / "gone.tiff"), "b", 512, 256)  # 2 tiles of a file that does not exist
    a.loc[a.index[-1], "overlap_error"] = "overlay unreadable"  # one tile whose overlap failed
    staging = tmp_path / "staging"
    staging.mkdir()
    fcfg = FilterConfig(max_background_fraction=None)
    sink = make_file_sink(DecodeConfig(encoding="raw", batch_mb=1.0), fcfg, LINEAGE, _schema(), str(staging))
    res = _run_sink(sink, [pd.concat([a, b], ignore_index=True)])

    ra = res[res["slide_id"] == "a"]
    rb = res[res["slide_id"] == "b"]
    assert ra["decoded"].sum() == 11 and ra["rows"].sum() == 11 and ra["failed"].sum() == 1
    assert [(f["tile_x"], f["tile_y"], f["stage"]) for f in ra["failures"].iloc[0]] == [(768, 512, "overlap")]
    assert rb["rows"].sum() == 0 and rb["file"].isna().all() and rb["decoded"].sum() == 2 and rb["failed"].sum() == 2
    fails = rb["failures"].iloc[0]
    assert sorted((f["tile_x"], f["tile_y"]) for f in fails) == [(0, 0), (256, 0)]
    assert all(f["stage"] == "decode" and "open failed" in f["error"] for f in fails)

    # the file holds exactly the table's columns but the partition column, with the run's lineage
    files = [f for f in ra["file"] if f]
    assert all(f.startswith("slide_id=a/") for f in files)
    t = pq.read_table([str(staging / f) for f in files], partitioning=None)
    assert t.column_names == [c for c in TILES_COLUMNS if c != "slide_id"] and t.num_rows == 11
    meta = pq.read_metadata(str(staging / files[0]))
    cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert cols["tile"].compression == "UNCOMPRESSED" and cols["tile_x"].compression == "ZSTD"
    assert meta.num_row_groups == 3  # 1 MiB batches: 5 raw 256 px tiles each (5 + 5 + 1)
    df = t.to_pandas()
    assert set(df["run_id"]) == {"run-1"} and set(df["config_hash"]) == {"cfg-1"}
    assert set(df["created_at"].dt.tz_convert(None)) == {pd.Timestamp(LINEAGE.created_at)}
    assert df["attributes"].map(dict).tolist() == [{"stain": "HE"}] * 11
    assert set(df["split"]) == {"train"} and set(df["patient_id"]) == {"P1"} and set(df["slide_label"]) == {"tumor"}
    # the results carry each file's tiles' level-0 rectangles, in the file's row order (for the QC picture)
    rects = np.concatenate([np.frombuffer(r, "<i4").reshape(-1, 4) for r in ra["rects"] if r])
    want = np.stack([df["level0_x"], df["level0_y"], df["level0_x"] + df["valid_width"],
                     df["level0_y"] + df["valid_height"]], axis=1)
    np.testing.assert_array_equal(rects, want)
    assert (want[:, 2] - want[:, 0]).min() == 1000 - 768  # the partial right-hand tiles
    assert not any(rb["rects"])
    osr = openslide.OpenSlide(str(good))
    for r in df.itertuples():
        ref = rgba_to_rgb(np.asarray(osr.read_region((int(r.level0_x), int(r.level0_y)), 0, (256, 256)))).copy()
        ref[:, r.valid_width:] = 255
        ref[r.valid_height:, :] = 255
        np.testing.assert_array_equal(decode_tile(r.tile, "raw", 256, 256), ref)


def test_keep_mask_applies_each_bound_and_rejects_failures():
    decoded = np.array([True, True, True, False, False])  # the last two: no tile, a decode error
    std = np.array([10.0, 2.0, 10.0, 10.0, 10.0])
    bg = np.array([0.1, 0.1, 0.95, 0.1, 0.1])
    assert keep_mask(decoded, std, bg, FilterConfig(min_std=5, max_background_fraction=0.9)).tolist() == [True, False, False, False, False]
    assert keep_mask(decoded, std, bg, FilterConfig(min_std=None, max_background_fraction=None)).tolist() == [True, True, True, False, False]
    nan = np.array([np.nan] * 5)
    assert not keep_mask(decoded, nan, nan, FilterConfig(min_std=0, max_background_fraction=1)).any()


def test_keep_mask_bounds_are_inclusive():
    """``min_std`` and ``max_background_fraction`` are inclusive bounds: a tile exactly on one
    passes, the next float beyond it does not."""
    std, bg = 5.0, 0.5
    keep = keep_mask(np.ones(4, bool), np.array([std, np.nextafter(std, 0), std, std]),
                     np.array([bg, bg, bg, np.nextafter(bg, 1)]), FilterConfig(min_std=std, max_background_fraction=bg))
    assert keep.tolist() == [True, False, True, False]


def test_pixel_filter_keeps_decoded_tiles_within_the_bounds():
    from slidelake.decode import DecodedBatch
    from slidelake.write import pixel_filter

    d = DecodedBatch([b"a", None, np.zeros((2, 2, 3), np.uint8), b"d"], np.zeros(4), np.array([9.0, 9.0, 9.0, 1.0]),
                     np.array([0.1, 0.1, 0.1, 0.1]), ["native", None, "native", "native"], [None, "bad", None, None])
    assert pixel_filter(d, FilterConfig(min_std=5, max_background_fraction=0.9)).tolist() == [0, 2]


def test_write_frame_commits_a_spark_dataframe_with_delta_rs(spark, tmp_path):
    """The generic Spark DataFrame writer (Spark Parquet in staging, one delta-rs commit)."""
    from pyspark.sql import functions as F

    from slidelake.lake import Lake

    lake = Lake(spark, str(tmp_path), "delta-rs", tiles_table="t")
    df = spark.range(10).withColumn("slide_id", (F.col("id") % 2).cast("string"))
    res = lake.write_frame("tiles", df, mode="overwrite", partition_by=["slide_id"])
    assert res.rows == 10 and res.rows_by_partition == {"0": 5, "1": 5}
    res2 = lake.write_frame("tiles", df.where("slide_id = '1'").withColumn("id", F.col("id") + 100), mode="overwrite",
                            partition_by=["slide_id"], replace_partitions=["1"])
    got = pl.read_delta(str(tmp_path / "t")).sort("id")
    assert res2.rows == 5 and got.height == 10
    assert sorted(got.filter(pl.col("slide_id") == "1")["id"].to_list()) == [101, 103, 105, 107, 109]
    assert not (tmp_path / "t" / "_staging").exists()


def test_file_sink_writes_the_same_files_with_and_without_direct_io(tmp_path):
    """``tables.direct_io`` changes how the bytes reach the disk, not the bytes."""
    good = tmp_path / "good.tiff"
    make_tiff(good, 1000, 700, levels=1, tile=128, compression="jpeg")
    rows = _rows(str(good), "a", 1000, 700)
    data = {}
    for direct in (True, False):
        staging = tmp_path / f"staging-{direct}"
        staging.mkdir()
        sink = make_file_sink(DecodeConfig(encoding="raw", batch_mb=1.0), FilterConfig(max_background_fraction=None),
                              LINEAGE, _schema(), str(staging), direct_io=direct)
        res = _run_sink(sink, [rows])
        (f,) = [f for f in res["file"] if f]
        data[direct] = (staging / f).read_bytes()
    assert len(data[True]) > 12 * 256 * 256 * 3 and data[True] == data[False]


def test_raw_tiles_go_into_the_arrow_column_as_the_bytes_of_their_pixels(tmp_path, monkeypatch):
    """The file sink's decoder keeps raw tiles as arrays (``raw_pixels``) and ``tile_column``
    copies them once into the Arrow column: the same values as the bytes the pandas decoder
    stores, for whole tiles, partial edge tiles (painted white) and tiles read across stored
    tiles (not aligned); encoded tiles and the >2 GiB fallback give the same column."""
    import slidelake.decode as D

    path = tmp_path / "s.tiff"
    make_tiff(path, 700, 500, levels=1, tile=128, compression="jpeg")
    rows = pd.concat([_rows(str(path), "a", 700, 500), _rows(str(path), "a", 700, 500, tile=200)], ignore_index=True)
    rows.loc[rows["tile_extent_x"] == 200, ["level0_x", "level0_y"]] += 37  # not on the stored 128 px grid
    rows["read_width"], rows["read_height"] = rows["tile_extent_x"], rows["tile_extent_y"]
    col = {c: rows[c].to_numpy() for c in D.DECODE_COLUMNS}
    as_bytes = D.TileDecoder(DecodeConfig(encoding="raw")).decode(col)
    as_arrays = D.TileDecoder(DecodeConfig(encoding="raw"), raw_pixels=True).decode(col)
    assert all(e is None for e in as_bytes.errors + as_arrays.errors)
    assert all(isinstance(t, bytes) for t in as_bytes.tiles)
    assert all(isinstance(t, np.ndarray) and t.flags.c_contiguous for t in as_arrays.tiles)
    np.testing.assert_array_equal(as_arrays.std, as_bytes.std)
    column = D.tile_column(as_arrays.tiles)
    assert column.type == pa.binary() and column.to_pylist() == as_bytes.tiles
    assert {len(b) for b in as_bytes.tiles} == {256 * 256 * 3, 200 * 200 * 3}
    assert D.tile_column(as_bytes.tiles).to_pylist() == as_bytes.tiles  # encoded tiles pass through
    monkeypatch.setattr(D, "MAX_BINARY_BYTES", 1000)
    assert D.tile_column(as_arrays.tiles).to_pylist() == as_bytes.tiles
    # only raw tiles are kept as arrays
    jpeg = D.TileDecoder(DecodeConfig(encoding="jpeg"), raw_pixels=True).decode(col)
    assert all(isinstance(t, bytes) for t in jpeg.tiles)


def test_staging_goes_under_the_table(tmp_path):
    """Tile files are staged in ``<table>/_staging/<uuid>`` (in the bucket for a lake on object
    storage: ``tests/test_s3.py``)."""
    from slidelake.lake import Lake

    local = Lake(None, str(tmp_path / "lake")).new_staging("tiles")
    assert os.path.isdir(local) and os.path.dirname(local) == str(tmp_path / "lake" / "tiles" / "_staging")