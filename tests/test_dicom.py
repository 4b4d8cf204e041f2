"""DICOM whole-slide images: a series of files is one slide, on series written from the real
CMU sample with wsidicomizer (its JPEG tiles copied, so pixels equal the SVS's)."""

import hashlib
import os
import shutil

import numpy as np
import openslide
import polars as pl
import pytest
from pydicom import dcmread

from conftest import CMU, need
from slidelake.config import PipelineConfig
from slidelake.dicom import collapse_series, series_files
from slidelake.encoding import decode_tile
from slidelake.pipeline import run_all
from slidelake.slides import list_inputs

EXT = ["dcm"]


def _kind(path):
    return str(dcmread(path, stop_before_pixels=True).ImageType[2])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """``(pyramid, jpegls)``: a folder holding CMU as a 5-level series with its label, overview
    and thumbnail images, and a folder holding it as one JPEG-LS level (a transfer syntax
    OpenSlide cannot decode)."""
    need(CMU)
    from wsidicom.codec.settings import JpegLsSettings
    from wsidicomizer import WsiDicomizer

    base = tmp_path_factory.mktemp("dicom")
    pyramid, jpegls = base / "pyramid", base / "jpegls"
    with WsiDicomizer.open(str(CMU)) as wsi:
        wsi.save(str(pyramid), add_missing_levels=True)
    with WsiDicomizer.open(str(CMU)) as wsi:
        wsi.save(str(jpegls), transcoding=JpegLsSettings(), force_transcoding=True, include_labels=False,
                 include_overviews=False, include_thumbnails=False)
    return pyramid, jpegls


def test_a_series_is_listed_once_by_its_level_0_file(series):
    pyramid, _ = series
    files = sorted(str(p) for p in pyramid.iterdir())
    kinds = {p: _kind(p) for p in files}
    assert sorted(kinds.values()).count("VOLUME") == 5 and {"LABEL", "OVERVIEW", "THUMBNAIL"} <= set(kinds.values())
    level0 = max((p for p in files if kinds[p] == "VOLUME"),
                 key=lambda p: dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns)
    slide_of = collapse_series(files)
    assert {p: slide_of[p] for p in files} == {p: (level0 if kinds[p] == "VOLUME" else None) for p in files}
    assert list_inputs([str(pyramid)], EXT)["path"].tolist() == [level0]
    # any one file of the series, or a manifest naming several, lists the same one slide
    assert list_inputs([files[0], files[-1]], EXT)["path"].tolist() == [level0]
    assert series_files(level0) == sorted(p for p in files if kinds[p] == "VOLUME")


@pytest.mark.spark
def test_a_series_is_one_slide_tiled_once_with_the_svs_pixels(spark, series, tmp_path):
    pyramid, jpegls = series
    copy = tmp_path / "copy"
    shutil.copytree(pyramid, copy)  # the same series in a second folder: the same slide
    lake = tmp_path / "lake"
    cfg = PipelineConfig.model_validate({
        "inputs": [str(pyramid), str(copy), str(jpegls)], "lake": str(lake), "resolution": {"level": 0},
        "grid": {"tile_extent": 512}, "masks": {"enabled": False}, "decode": {"encoding": "png"},
        "filter": {"max_background_fraction": None}, "discovery": {"extensions": EXT}})
    rec = run_all(spark, cfg)
    slides = pl.read_delta(str(lake / "slides")).sort("path")
    assert slides.height == 3  # two copies of the series and the JPEG-LS one; no label, overview or thumbnail
    ok = slides.filter(pl.col("status") == "ok")
    assert ok.height == 2 and ok["slide_id"].n_unique() == 1 and set(ok["vendor"]) == {"dicom"}
    level_files = sorted(f for f in os.listdir(pyramid) if _kind(str(pyramid / f)) == "VOLUME")
    assert ok["files"].to_list() == [level_files, level_files]
    digest = hashlib.sha256(b"".join((pyramid / f).read_bytes() for f in level_files)).hexdigest()
    assert set(ok["fingerprint"]) == {digest}
    assert ok["level_count"].to_list() == [5, 5] and ok["width"].to_list() == [2220, 2220]
    bad = slides.filter(pl.col("status") == "error").row(0, named=True)
    assert "Unsupported transfer syntax 1.2.840.10008.1.2.4.80" in bad["error"]
    tiles = pl.read_delta(str(lake / "tiles"))
    assert tiles.height == rec.counts["tiles_written"] == 4 * 5  # 2220 x 2967 in 512 px tiles, once
    assert tiles["slide_id"].n_unique() == 1
    with openslide.OpenSlide(str(CMU)) as svs:
        for r in tiles.sample(6, seed=1).iter_rows(named=True):
            want = np.asarray(svs.read_region((r["level0_x"], r["level0_y"]), 0, (512, 512)).convert("RGB"))
            assert np.array_equal(decode_tile(r["tile"], "png", 512, 512), want)
    again = run_all(spark, cfg)
    assert again.counts["slides_skipped"] == 1 and pl.read_delta(str(lake / "tiles")).height == 20
