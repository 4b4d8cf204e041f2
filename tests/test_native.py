"""The native-tile reader against OpenSlide's read_region."""

import numpy as np
import openslide
import pytest

from conftest import CMU, DAPI, TCGA, make_tiff, need
from slidelake.decode import rgba_to_rgb
from slidelake.native import CorruptTileError, check_jpeg, open_native


def regions(rng, width, height, n=60):
    """Random regions, some crossing or beyond the level's edges."""
    out = [(0, 0, 256, 256), (width - 100, height - 100, 256, 256), (-10, -10, 50, 50)]
    for _ in range(n):
        w, h = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        out.append((int(rng.integers(-50, width)), int(rng.integers(-50, height)), w, h))
    return out


def test_cmu_native_reads_equal_read_region_bit_for_bit():
    need(CMU)
    native = open_native(str(CMU))
    osr = openslide.OpenSlide(str(CMU))
    lvl = native.level(0)
    assert lvl is not None and (lvl.tile_w, lvl.tile_h) == (240, 240)
    rng = np.random.default_rng(0)
    for x, y, w, h in regions(rng, 2220, 2967):
        ref = rgba_to_rgb(np.asarray(osr.read_region((x, y), 0, (w, h))))
        got = lvl.read(x, y, w, h)
        assert got.shape == (h, w, 3)
        np.testing.assert_array_equal(got, ref, err_msg=f"region {x},{y},{w},{h}")
    native.close()


def test_generated_jpeg_pyramid_every_level(tmp_path):
    path = tmp_path / "jpeg.tiff"
    make_tiff(path, 1500, 1100, levels=3, tile=128, compression="jpeg")
    native = open_native(str(path))
    osr = openslide.OpenSlide(str(path))
    assert osr.properties["openslide.vendor"] == "generic-tiff"
    rng = np.random.default_rng(1)
    for k in range(3):
        lvl = native.level(k)
        assert lvl is not None
        W, H = osr.level_dimensions[k]
        ds = int(osr.level_downsamples[k])
        for x, y, w, h in regions(rng, W, H, 20):
            ref = rgba_to_rgb(np.asarray(osr.read_region((x * ds, y * ds), k, (w, h))))
            np.testing.assert_array_equal(lvl.read(x, y, w, h), ref, err_msg=f"level {k} region {x},{y},{w},{h}")


def test_other_formats_have_no_native_levels(tmp_path):
    need(DAPI, TCGA)
    assert open_native(str(DAPI)).levels == {}  # NDPI: JPEG strips, OpenSlide reads it
    assert open_native(str(TCGA)).levels == {}  # JPEG 2000 tiles
    make_tiff(tmp_path / "raw.tiff", 300, 200, tile=64)  # uncompressed tiles
    assert open_native(str(tmp_path / "raw.tiff")).levels == {}


def test_check_jpeg_catches_truncated_and_overwritten_tiles():
    need(CMU)
    native = open_native(str(CMU))
    lvl = native.level(0)
    good = bytes(__import__("os").pread(lvl.fd, int(lvl.counts[5]), int(lvl.offsets[5])))
    check_jpeg(good)
    # (overwrites that happen to look like stuffed entropy data with a final EOI pass this check;
    # libjpeg-turbo may then decode them as noise without an error)
    for bad in (good[: len(good) // 2], good[:-2], good[:300] + b"\xff\xc4" + good[302:], b"\x00" + good[1:]):
        with pytest.raises(CorruptTileError):
            check_jpeg(bad)
    native.close()


def test_corrupt_tiles_are_flagged_where_openslide_fails(tmp_path):
    need(CMU)
    data = bytearray(CMU.read_bytes())
    at = int(len(data) * 0.3)
    data[at: at + 20000] = b"\xff\x00" * 10000
    p = tmp_path / "corrupt.svs"
    p.write_bytes(bytes(data))
    lvl = open_native(str(p)).level(0)
    for idx in range(len(lvl.offsets)):
        row, col = divmod(idx, lvl.across)
        try:
            lvl.stored_tile(col, row)
            native_ok = True
        except CorruptTileError:
            native_ok = False
        try:
            openslide.OpenSlide(str(p)).read_region((col * 240, row * 240), 0, (240, 240))
            os_ok = True
        except openslide.OpenSlideError:
            os_ok = False
        # never silently accept a tile OpenSlide rejects
        assert native_ok <= os_ok, f"stored tile {idx}"


def test_benchmark_slide_native_reads_equal_read_region(tmp_path):
    """The benchmark's synthetic Aperio-style slide (small here), every level."""
    need(CMU)
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from make_slide import make_slide

    info = make_slide(tmp_path / "bench.svs", 3000, 2200, source=str(CMU))
    osr = openslide.OpenSlide(info["path"])
    assert osr.properties["openslide.vendor"] == "aperio"
    assert float(osr.properties["openslide.mpp-x"]) == 0.25 and osr.level_count == 2
    native = open_native(info["path"])
    rng = np.random.default_rng(2)
    for k in range(osr.level_count):
        W, H = osr.level_dimensions[k]
        ds = int(round(osr.level_downsamples[k]))
        for x, y, w, h in regions(rng, W, H, 15):
            ref = rgba_to_rgb(np.asarray(osr.read_region((x * ds, y * ds), k, (w, h))))
            np.testing.assert_array_equal(native.level(k).read(x, y, w, h), ref)
