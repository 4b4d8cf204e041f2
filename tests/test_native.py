"""The native-tile reader against OpenSlide's read_region."""

import numpy as np
import openslide
import pytest

from conftest import CMU, DAPI, TCGA, corrupt_copy, make_tiff, need
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


def test_readahead_fetches_a_row_of_stored_tiles_in_one_read_and_decodes_the_same():
    """A level read with ``readahead`` (as from an object) gives the same pixels as one read per
    stored tile, in fewer reads, each of tiles whose bytes follow on in the file."""
    import os

    from slidelake.native import NativeLevel

    need(CMU)
    native = open_native(str(CMU))
    page = native.level(0)
    reads = []

    def pread(n, offset):
        reads.append((offset, n))
        return os.pread(native._fd, n, offset)

    ahead = NativeLevel(pread, native._tf.pages[0], cache_tiles=0, readahead=4)
    rng = np.random.default_rng(3)
    for x, y, w, h in [(0, 0, 2220, 500), *regions(rng, 2220, 2967, n=20)]:
        np.testing.assert_array_equal(ahead.read(x, y, w, h, cache=False), page.read(x, y, w, h, cache=False))
    across = page.across
    first_rows = [r for r in reads[:3]]  # the first region: 10 tiles a row, read 4 + 4 + 2
    assert [n for _, n in first_rows] == [sum(int(page.counts[i]) for i in range(a, b))
                                          for a, b in ((0, 4), (4, 8), (8, across))]
    assert len(ahead._ahead) <= 8
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


def test_regions_on_the_stored_tile_grid(tmp_path):
    """A region that is exactly one stored tile comes back as the decoded tile itself (read-only,
    the same pixels as read_region); edge tiles that run past the level are still assembled."""
    path = tmp_path / "jpeg.tiff"
    make_tiff(path, 1000, 700, levels=1, tile=128, compression="jpeg")
    native = open_native(str(path))
    osr = openslide.OpenSlide(str(path))
    lvl = native.level(0)
    whole = 0
    for y in range(0, 700, 128):
        for x in range(0, 1000, 128):
            got = lvl.read(x, y, 128, 128)
            ref = rgba_to_rgb(np.asarray(osr.read_region((x, y), 0, (128, 128))))
            np.testing.assert_array_equal(got, ref, err_msg=f"tile at {x},{y}")
            inside = x + 128 <= 1000 and y + 128 <= 700
            assert got.flags.writeable == (not inside)
            whole += inside
    assert whole == 7 * 5
    with pytest.raises(ValueError, match="read-only"):
        lvl.read(0, 0, 128, 128)[0, 0] = 0  # the cached tile cannot be changed through it
    np.testing.assert_array_equal(lvl.read(0, 0, 128, 128), rgba_to_rgb(np.asarray(osr.read_region((0, 0), 0, (128, 128)))))


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
    good = bytes(lvl.pread(int(lvl.counts[5]), int(lvl.offsets[5])))
    check_jpeg(good)
    # (overwrites that happen to look like stuffed entropy data with a final EOI pass this check;
    # libjpeg-turbo may then decode them as noise without an error)
    mid = len(good) // 2  # inside the entropy-coded data
    for bad in (good[: len(good) // 2], good[:-2], good[:300] + b"\xff\xc4" + good[302:], b"\x00" + good[1:],
                good[:mid] + b"\xff\x01" + good[mid + 2:],  # a marker that is neither stuffing nor RST
                good[:mid] + b"\xff\xff\x00" + good[mid + 3:],  # 0xFF followed by 0xFF
                good[:-2] + b"\xff\xff\xd9"):  # a lone 0xFF at the end of the entropy data
        with pytest.raises(CorruptTileError):
            check_jpeg(bad)
    check_jpeg(good[:mid] + b"\xff\xd3" + good[mid + 2:])  # restart markers are allowed
    for i in range(len(lvl.counts)):  # every stored tile of the real slide passes
        check_jpeg(lvl.pread(int(lvl.counts[i]), int(lvl.offsets[i])))
    native.close()


def test_corrupt_tiles_are_flagged_where_openslide_fails(tmp_path):
    need(CMU)
    p = corrupt_copy(CMU, tmp_path / "corrupt.svs")
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


def test_decoder_uses_native_reader_with_byte_bounded_batches(tmp_path):
    from slidelake.config import DecodeConfig
    from slidelake.decode import TileDecoder, tile_stats
    from slidelake.encoding import decode_tile

    path = tmp_path / "jpeg.tiff"
    make_tiff(path, 1500, 1100, levels=2, tile=128, compression="jpeg")
    xs, ys = (a.ravel() for a in np.meshgrid(np.arange(0, 1500, 256), np.arange(0, 1100, 256)))
    n = xs.size
    col = {
        "slide_id": np.array(["s"] * n, object), "path": np.array([str(path)] * n, object),
        "fingerprint": np.array(["f"] * n, object), "level": np.zeros(n, np.int32),
        "level_downsample": np.ones(n), "level0_x": xs, "level0_y": ys,
        "read_width": np.full(n, 256), "read_height": np.full(n, 256),
        "tile_extent_x": np.full(n, 256), "tile_extent_y": np.full(n, 256),
        "valid_width": np.minimum(256, 1500 - xs), "valid_height": np.minimum(256, 1100 - ys),
        "tile_x": xs, "tile_y": ys,
    }
    decoder = TileDecoder(DecodeConfig(encoding="raw", batch_mb=1.0))
    assert decoder.rows_per_batch(256, 256) == 5  # 1 MiB = 5 raw 256 px tiles (196,608 bytes each)
    assert decoder.rows_per_batch(100, 100) == 34  # 1 MiB / 30,000 bytes
    got = decoder.decode(col)
    assert set(got.readers) == {"native"} and got.errors == [None] * n
    osr = openslide.OpenSlide(str(path))
    for i in range(n):
        rgb = decode_tile(got.tiles[i], "raw", 256, 256)
        ref = rgba_to_rgb(np.asarray(osr.read_region((int(xs[i]), int(ys[i])), 0, (256, 256)))).copy()
        ref[:, col["valid_width"][i]:] = 255
        ref[col["valid_height"][i]:, :] = 255
        np.testing.assert_array_equal(rgb, ref)
        mean, std, bg = tile_stats(ref, 220)
        assert (got.mean[i], got.std[i], got.background_fraction[i]) == pytest.approx((mean, std, bg))
    # the statistics agree with the plain NumPy definitions
    grey = ref.mean(axis=2)
    assert (mean, std, bg) == pytest.approx((grey.mean(), grey.std(), (ref.min(axis=2) >= 220).mean()))


@pytest.mark.spark
def test_each_stored_tile_is_decoded_once_per_region(spark, tmp_path, monkeypatch):
    """Output tiles of 200 px over stored tiles of 128 px (unaligned): a task walks its tiles
    region by region, in raster order within a region, so the native reader's cache
    (``native_cache_tiles``, default 32) serves every reuse inside a region: each stored tile a
    region touches is read and decoded once."""
    import os

    from slidelake.config import DecodeConfig, PartitionConfig
    from slidelake.decode import DECODE_COLUMNS, TileDecoder, repartition_tiles
    from slidelake.grid import expand_grid, grid_constants

    path = tmp_path / "unaligned.tiff"
    make_tiff(path, 2000, 1500, levels=1, tile=128, compression="jpeg")
    slides = spark.createDataFrame(
        [("s", str(path), "f", 2000, 1500, 1.0, 0, 1.0, 200, 200)],
        "slide_id string, path string, fingerprint string, extent_x long, extent_y long, downsample double, "
        "level int, level_downsample double, read_width int, read_height int")
    grid = expand_grid(spark, [dict(slide_id="s", extent_x=2000, extent_y=1500, downsample=1.0)], (200, 200),
                       (200, 200), "keep").join(slides.drop("extent_x", "extent_y", "downsample"), "slide_id") \
        .withColumns(grid_constants((200, 200), (200, 200)))
    parts = repartition_tiles(grid, PartitionConfig(region_tiles=4, tiles_per_partition=30), grid.count()) \
        .select(*DECODE_COLUMNS).rdd.glom().collect()
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(off) or real_pread(fd, n, off))
    decoded = 0
    for rows in parts:
        if not rows:
            continue
        decoder = TileDecoder(DecodeConfig(encoding="raw"))
        reads.clear()
        d = decoder.decode({c: np.array([r[c] for r in rows], dtype=object) for c in DECODE_COLUMNS})
        assert any(lvl._cache for h in decoder.natives.items.values() for lvl in h.levels.values())
        decoder.end_task()  # a finished task leaves no decoded stored tiles in the worker
        assert not any(lvl._cache for h in decoder.natives.items.values() for lvl in h.levels.values())
        assert all(e is None for e in d.errors) and set(d.readers) == {"native"}
        def stored(rs):
            return {(cx, cy) for r in rs
                    for cx in range(r.tile_x // 128, min(r.tile_x + 199, 1999) // 128 + 1)
                    for cy in range(r.tile_y // 128, min(r.tile_y + 199, 1499) // 128 + 1)}

        regions = {}
        for r in rows:
            regions.setdefault((r.tile_y // 800, r.tile_x // 800), []).append(r)
        assert len(set(reads)) == len(stored(rows))
        # within a region every stored tile is read once; only a stored tile shared by two
        # neighbouring regions of the task can be read again
        assert len(reads) <= sum(len(stored(rs)) for rs in regions.values())
        decoded += len(rows)
    assert decoded == 10 * 8


def test_check_jpeg_bounds_on_hand_made_streams():
    """Marker segments exactly at the edges of the data, a segment of 300 bytes (a length whose
    high byte counts), the shortest legal segment and an empty scan, with the first problem
    named (hand-made byte streams: SOI, segments, SOS, entropy data, EOI)."""
    soi, eoi = b"\xff\xd8", b"\xff\xd9"
    check_jpeg(soi + b"\xff\xda\x00\x02" + eoi)  # SOS of the shortest length, empty scan
    check_jpeg(soi + b"\xff\xe0\x01\x2c" + bytes(298) + b"\xff\xda\x00\x02" + b"ab" + eoi)  # a 300-byte APP0
    check_jpeg(soi + b"\xff\xda\x00\x03\xff" + eoi)  # a segment ending in 0xFF before an empty scan
    cases = {
        soi + eoi: r"^malformed JPEG marker segment at byte 2$",
        soi + b"\xff\xda\xff\xd9": r"^JPEG segment 0xda at byte 2 runs past the data$",
        soi + b"\xff\xe0\x00\x04" + eoi: r"^malformed JPEG marker segment at byte 8$",
        soi + b"\xff\xe0\x00\x01\xff\xda\x00\x02" + eoi: r"^JPEG segment 0xe0 at byte 2 runs past the data$",
        b"\xff\xd9": r"^stored tile does not start with a JPEG SOI marker$",
        soi + b"\xff\xda\x00\x02ab": r"^stored tile does not end with a JPEG EOI marker \(truncated or overwritten\)$",
        soi + b"\xff\xda\x00\x02a\xff" + eoi: r"^JPEG entropy data ends with a lone 0xFF$",
        soi + b"\xff\xda\x00\x02a\xff\x01b" + eoi: r"^invalid marker 0xff01 inside JPEG entropy data at byte 7$",
    }
    for data, message in cases.items():
        with pytest.raises(CorruptTileError, match=message):
            check_jpeg(data)
