"""End-to-end tiling on the real slides and generated ones."""

import os
import shutil

import numpy as np
import openslide
import polars as pl
import pytest
from deltalake import DeltaTable
from PIL import Image

from conftest import CMU, DAPI, TCGA, corrupt_copy, make_fluorescence_tiff, make_tiff, need
from slidelake.config import PipelineConfig
from slidelake.decode import rgba_to_rgb
from slidelake.encoding import decode_tile
from slidelake.pipeline import ConfigMismatchError, run_all, run_tile

pytestmark = pytest.mark.spark

# every tile of the grid, undecoded pixels: no tissue masks, no pixel filter
RAW_ALL = {"decode": {"encoding": "raw"}, "filter": {"max_background_fraction": None}, "masks": {"enabled": False}}


def cfg_for(lake, inputs, **kw):
    base = {"inputs": [str(p) for p in inputs], "lake": str(lake), **RAW_ALL}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return PipelineConfig.model_validate(base)


def tiles_of(lake, table="tiles"):
    return pl.read_delta(str(lake / table))


def test_tile_pixels_equal_read_region(spark, lake):
    need(CMU)
    cfg = cfg_for(lake, [CMU], resolution={"level": 0}, grid={"tile_extent": 256, "last": "keep"})
    rec = run_all(spark, cfg)
    t = tiles_of(lake)
    # 2220 x 2967 with 256 px tiles, partial edge tiles kept: 9 x 12
    assert t.height == 9 * 12 == rec.counts["tiles_written"] == rec.counts["tiles_generated"]
    with openslide.OpenSlide(str(CMU)) as s:
        for r in t.sample(12, seed=3).iter_rows(named=True):
            px = decode_tile(r["tile"], r["tile_format"], r["tile_width"], r["tile_height"])
            want = rgba_to_rgb(np.asarray(s.read_region((r["level0_x"], r["level0_y"]), r["level"], (256, 256))))
            assert np.array_equal(px, want)
        # an edge tile is padded white beyond the slide
        edge = t.filter((pl.col("tile_x") == 2048) & (pl.col("tile_y") == 2816)).row(0, named=True)
        px = decode_tile(edge["tile"], "raw", 256, 256)
        assert (edge["valid_width"], edge["valid_height"]) == (2220 - 2048, 2967 - 2816)
        assert (px[:, 172:] == 255).all() and (px[151:, :] == 255).all()
        inside = rgba_to_rgb(np.asarray(s.read_region((2048, 2816), 0, (172, 151))))
        assert np.array_equal(px[:151, :172], inside)
    r = t.row(0, named=True)
    assert r["mpp_x"] == pytest.approx(0.499) and r["level"] == 0 and r["downsample"] == 1.0
    assert r["run_id"] == rec.run_id and r["config_hash"] == rec.config_hash
    assert r["slidelake_version"] and r["fingerprint"].startswith(r["slide_id"])
    assert t["tile_id"].n_unique() == t.height


def test_ndpi_picks_level_for_mpp_and_pixels_match(spark, lake):
    need(DAPI)
    # 0.9127 µm/px = 0.22818 x 4: level 2 of the NDPI pyramid
    cfg = cfg_for(lake, [DAPI], resolution={"mpp": 0.9127, "fallback": "error", "tolerance": 0.01},
                  grid={"tile_extent": 128, "last": "drop"})
    run_all(spark, cfg)
    t = tiles_of(lake)
    assert set(t["level"]) == {2}
    assert t["mpp_x"][0] == pytest.approx(0.2281750559028887 * 4)
    assert t.height == (992 // 128) * (1216 // 128)
    with openslide.OpenSlide(str(DAPI)) as s:
        for r in t.sample(5, seed=1).iter_rows(named=True):
            assert r["level0_x"] == r["tile_x"] * 4
            want = rgba_to_rgb(np.asarray(s.read_region((r["level0_x"], r["level0_y"]), 2, (128, 128))))
            assert np.array_equal(decode_tile(r["tile"], "raw", 128, 128), want)


def test_resample_reads_finer_level_and_resizes(spark, lake):
    need(CMU)
    # CMU has a single level at 0.499 µm/px; 1.0 µm/px needs resampling from level 0
    cfg = cfg_for(lake, [CMU], resolution={"mpp": 1.0, "fallback": "resample"},
                  grid={"tile_extent": 128, "last": "drop"})
    run_all(spark, cfg)
    t = tiles_of(lake)
    d = 1.0 / 0.499
    assert t["mpp_x"][0] == pytest.approx(1.0) and t["downsample"][0] == pytest.approx(d)
    assert t.height == (int(2220 / d) // 128) * (int(2967 / d) // 128)
    r = t.sort(["tile_y", "tile_x"]).row(5, named=True)
    with openslide.OpenSlide(str(CMU)) as s:
        n = round(128 * d)
        region = rgba_to_rgb(np.asarray(s.read_region((r["level0_x"], r["level0_y"]), 0, (n, n))))
    want = np.asarray(Image.fromarray(region).resize((128, 128), Image.Resampling.LANCZOS))
    assert np.array_equal(decode_tile(r["tile"], "raw", 128, 128), want)


def test_missing_mpp_is_a_slide_error_then_tiles_with_assumed_mpp(spark, lake):
    need(TCGA, CMU)
    cfg = cfg_for(lake, [TCGA, CMU], resolution={"mpp": 1.0}, grid={"tile_extent": 512})
    rec = run_all(spark, cfg)
    assert rec.status == "succeeded"
    errs = [e for e in rec.slide_errors if e["stage"] == "resolution"]
    assert len(errs) == 1 and errs[0]["path"] == str(TCGA) and "no mpp" in errs[0]["error"]
    assert set(tiles_of(lake)["path"]) == {str(CMU)}
    runs = pl.read_delta(str(lake / "runs"))
    assert runs["slide_errors"][0][0]["stage"] == "resolution"

    cfg2 = cfg_for(lake, [TCGA], resolution={"mpp": 1.0, "assumed_mpp": 0.5, "fallback": "error", "tolerance": 0.01},
                   grid={"tile_extent": 512})
    rec2 = run_all(spark, cfg2, replace_table=True)
    t = tiles_of(lake)
    assert not rec2.slide_errors
    assert set(t["level"]) == {1} and t["mpp_x"][0] == pytest.approx(0.5 * 2.0005055500659967)
    assert t.height == (2221 // 512) * (1783 // 512)


def test_rerun_is_idempotent_and_other_readers_agree(spark, lake, tmp_path):
    need(CMU, DAPI)
    cfg = cfg_for(lake, [CMU, DAPI], resolution={"mpp": 0.5}, grid={"tile_extent": 256},
                  decode={"encoding": "jpeg"}, filter={"max_background_fraction": 0.9})
    r1 = run_all(spark, cfg)
    n1 = tiles_of(lake).height
    r2 = run_all(spark, cfg, force=True)  # redo both slides (a plain rerun skips them)
    t = tiles_of(lake)
    assert n1 == t.height == r1.counts["tiles_written"] == r2.counts["tiles_written"] > 0
    assert set(t["run_id"]) == {r2.run_id}
    assert t.select("slide_id", "tile_x", "tile_y").is_duplicated().sum() == 0
    # delta-rs reader (not Spark) agrees, and sees two commits to the tile table
    dt = DeltaTable(str(lake / "tiles"))
    assert dt.version() == 1
    assert len(dt.file_uris()) > 0
    # filtered + written = generated
    assert r2.counts["tiles_filtered"] + r2.counts["tiles_written"] + r2.counts["tiles_failed"] == r2.counts["tiles_generated"]
    assert r2.counts["tiles_filtered"] > 0  # CMU has white background
    kept = t.filter(pl.col("path") == str(CMU))
    assert (kept["background_fraction"] <= 0.9).all()
    # same content under a second path: one copy of its tiles
    shutil.copy(CMU, tmp_path / "cmu-copy.svs")
    cfg3 = cfg.model_copy(update={"inputs": [str(CMU), str(tmp_path / "cmu-copy.svs"), str(DAPI)]})
    run_all(spark, cfg3)
    assert tiles_of(lake).height == n1


def test_different_config_never_mixes_silently(spark, lake, tmp_path):
    need(CMU, DAPI)
    run_all(spark, cfg_for(lake, [CMU, DAPI], resolution={"level": 0}, grid={"tile_extent": 512}))
    other = cfg_for(lake, [CMU], resolution={"level": 0}, grid={"tile_extent": 256})
    with pytest.raises(ConfigMismatchError, match="different tiling config"):
        run_tile(spark, other)
    runs = pl.read_delta(str(lake / "runs")).sort("started_at")
    assert runs["status"].to_list() == ["succeeded", "failed"]
    assert len(set(tiles_of(lake)["config_hash"])) == 1
    # to a table of its own: fine
    sep = other.model_copy(update={"tables": other.tables.model_copy(update={"tiles_table": "tiles_256"})})
    run_tile(spark, sep)
    assert set(tiles_of(lake, "tiles_256")["tile_extent_x"]) == {256}


def test_corrupt_and_empty_files_among_good_slides(spark, lake, tmp_path):
    need(CMU, DAPI)
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(DAPI, d / "good.ndpi")
    (d / "empty.svs").write_bytes(b"")
    (d / "junk.svs").write_bytes(b"not a slide" * 100)
    corrupt_copy(CMU, d / "corrupt-tiles.svs")  # corrupt JPEG tile data, header intact
    cfg = cfg_for(lake, [d], resolution={"level": 0}, grid={"tile_extent": 256})
    rec = run_all(spark, cfg)
    assert rec.status == "succeeded"
    assert rec.counts["slides_error"] == 2
    t = tiles_of(lake)
    by_slide = dict(zip(*t.group_by("path").len().sort("path").to_dict(as_series=False).values()))
    assert by_slide[str(d / "good.ndpi")] == (3968 // 256) * (4864 // 256)
    counts = {c["path"]: c for c in rec.slide_counts}
    bad = counts[str(d / "corrupt-tiles.svs")]
    assert bad["tiles_failed"] > 0
    assert bad["tiles_written"] == bad["tiles_generated"] - bad["tiles_failed"] > 0
    assert any(e["stage"] == "decode" for e in rec.slide_errors)
    # every failed tile is in tile_errors with its coordinates, none of them among the tiles
    errs = pl.read_delta(str(lake / "tile_errors"))
    assert errs.height == rec.counts["tiles_failed"] == bad["tiles_failed"]
    assert set(errs["path"]) == {str(d / "corrupt-tiles.svs")} and set(errs["run_id"]) == {rec.run_id}
    assert set(errs["stage"]) == {"decode"} and errs["error"].str.len_chars().min() > 0
    failed_xy = set(zip(errs["tile_x"], errs["tile_y"]))
    written_xy = set(zip(*t.filter(pl.col("path") == str(d / "corrupt-tiles.svs")).select("tile_x", "tile_y")))
    assert len(failed_xy) == errs.height and not failed_xy & written_xy
    assert len(failed_xy | written_xy) == bad["tiles_generated"]


def test_generated_pyramid_tiff_level_and_roi(spark, lake, tmp_path):
    img = make_tiff(tmp_path / "gen.tiff", 900, 700, levels=3, tile=64, mpp=0.25)
    cfg = cfg_for(lake, [tmp_path / "gen.tiff"], resolution={"downsample": 2, "fallback": "error"},
                  grid={"tile_extent": 100, "stride": 80, "last": "shift", "roi": [200, 100, 500, 400]})
    run_all(spark, cfg)
    t = tiles_of(lake)
    assert set(t["level"]) == {1} and t["mpp_x"][0] == pytest.approx(0.5)
    # ROI in tile px: x 100..350 (250 px), y 50..250 (200 px)
    xs, ys = sorted(set(t["tile_x"])), sorted(set(t["tile_y"]))
    assert xs == [100, 180, 250] and ys == [50, 130, 150]
    lvl1 = img[::2, ::2]
    for r in t.iter_rows(named=True):
        px = decode_tile(r["tile"], "raw", 100, 100)
        assert np.array_equal(px, lvl1[r["tile_y"]: r["tile_y"] + 100, r["tile_x"]: r["tile_x"] + 100])


def test_file_deleted_between_discovery_and_tiling(spark, lake, tmp_path):
    make_tiff(tmp_path / "a.tiff", 300, 200, mpp=0.5)
    make_tiff(tmp_path / "b.tiff", 300, 200, mpp=0.5, seed=1)
    from slidelake.pipeline import run_discover

    cfg = cfg_for(lake, [tmp_path], resolution={"level": 0}, grid={"tile_extent": 100})
    run_discover(spark, cfg)
    (tmp_path / "a.tiff").unlink()
    rec = run_tile(spark, cfg.model_copy(update={"inputs": []}))
    assert rec.status == "succeeded"
    counts = {c["path"]: c for c in rec.slide_counts}
    gone = counts[str(tmp_path / "a.tiff")]
    assert gone["tiles_generated"] == 6 and gone["tiles_failed"] == 6 and gone["tiles_written"] == 0
    assert counts[str(tmp_path / "b.tiff")]["tiles_written"] == 6
    assert tiles_of(lake).height == 6
    assert any("open failed" in e["error"] for e in rec.slide_errors if e["stage"] == "decode")


def test_pathological_inputs_give_error_rows_and_the_good_slide_is_tiled(spark, lake, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    make_tiff(d / "good.tiff", 300, 200, mpp=0.5)
    make_tiff(d / "absurd.tiff", 300, 200, mpp=400.0, seed=3)  # resolution tags claiming 400 µm/px
    os.mkfifo(d / "pipe.svs")  # reading it would block forever
    os.symlink(d / "missing.svs", d / "dangling.svs")
    os.symlink(d / "loop.svs", d / "loop.svs")
    (d / "zero.ndpi").write_bytes(b"")
    cfg = cfg_for(lake, [d], resolution={"level": 0}, grid={"tile_extent": 100},
                  masks={"enabled": True, "max_megapixels": 1.0}, filter={"min_tissue_fraction": None})
    rec = run_all(spark, cfg)
    assert rec.status == "succeeded"
    slides = {os.path.basename(r["path"]): r for r in pl.read_delta(str(lake / "slides")).iter_rows(named=True)}
    assert slides["pipe.svs"]["status"] == "error" and "not a regular file" in slides["pipe.svs"]["error"]
    assert slides["dangling.svs"]["status"] == "error" and "No such file" in slides["dangling.svs"]["error"]
    assert slides["loop.svs"]["status"] == "error" and "symbolic links" in slides["loop.svs"]["error"]
    assert slides["zero.ndpi"]["status"] == "error" and "empty" in slides["zero.ndpi"]["error"]
    # its mask would be 15,000 x 10,000 px at 8 µm/px: an error row, not an out-of-memory crash
    assert rec.counts["masks_failed"] == 1
    err = next(e for e in rec.slide_errors if e["stage"] == "masks")
    assert err["path"] == str(d / "absurd.tiff") and "max_megapixels" in err["error"]
    t = tiles_of(lake)
    assert set(t["path"]) == {str(d / "good.tiff")} and t.height == 6


def test_summary_says_when_a_slide_is_tiled_at_another_mpp(spark, lake, tmp_path):
    """Asked 0.7 µm/px of a 0.5 / 1.0 µm/px pyramid, ``nearest`` reads level 0: the summary names
    the slide, the level and the tiles' effective mpp; a slide tiled as asked gets no line."""
    from slidelake.pipeline import summary

    make_tiff(tmp_path / "s.tiff", 600, 400, levels=2, mpp=0.5)
    rec = run_all(spark, cfg_for(lake, [tmp_path / "s.tiff"], resolution={"mpp": 0.7, "fallback": "nearest"}))
    assert rec.status == "succeeded"
    lines = [ln for ln in summary(rec).splitlines() if ln.startswith("  ~ ")]
    assert lines == [f"  ~ {tmp_path / 's.tiff'}: tiles at 0.500 µm/px from level 0 (asked 0.7)"]
    same = run_all(spark, cfg_for(tmp_path / "lake2", [tmp_path / "s.tiff"], resolution={"mpp": 1.0}))
    assert not [ln for ln in summary(same).splitlines() if ln.startswith("  ~ ")]


def _disk_fraction(x0: int, y0: int, size: int, disk: tuple[float, float, int]) -> float:
    """Fraction of the tile ``[x0, x0 + size)^2`` (level-0 px) inside the disk, by counting
    pixel centres (the brute-force answer)."""
    cx, cy, r = disk
    yy, xx = np.mgrid[y0:y0 + size, x0:x0 + size]
    return float(((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r ** 2).mean())


def test_fluorescence_mask_keeps_the_bright_tissue_at_pipeline_level(spark, lake, tmp_path):
    """Polarity end to end on a synthetic fluorescence slide (no shared slides needed): the
    default config's mask finds the bright disk, not the black glass, and the tiles kept are
    those the disk covers (a tight check against the disk's geometry: an inverted mask or one
    off by a few mask pixels fails)."""
    disk = make_fluorescence_tiff(tmp_path / "fluo.tiff")
    cfg = cfg_for(lake, [tmp_path / "fluo.tiff"], resolution={"level": 0}, grid={"tile_extent": 256},
                  masks={"enabled": True}, filter={"min_tissue_fraction": 0.5})
    rec = run_all(spark, cfg)
    masks = pl.read_delta(str(lake / "masks"))
    assert masks["polarity"].to_list() == ["fluorescence"]
    # the mask's edge lies within 2 mask px (16 µm = 32 level-0 px) inside to 3 outside the disk's
    # (smoothing, then a threshold on log intensity, move it outwards)
    cx, cy, r = disk
    inner, outer = (cx, cy, r - 32), (cx, cy, r + 48)
    assert np.pi * inner[2] ** 2 <= masks["tissue_fraction"][0] * 4096 * 3072 <= np.pi * outer[2] ** 2
    t = tiles_of(lake)
    grid = [(x, y) for x in range(0, 4096, 256) for y in range(0, 3072, 256)]
    lo = {k: _disk_fraction(*k, 256, inner) for k in grid}
    hi = {k: _disk_fraction(*k, 256, outer) for k in grid}
    kept = {(x, y) for x, y in zip(t["tile_x"], t["tile_y"])}
    assert {k for k in grid if lo[k] >= 0.5} <= kept <= {k for k in grid if hi[k] >= 0.5}
    for row in t.iter_rows(named=True):
        k = (row["tile_x"], row["tile_y"])
        assert lo[k] - 0.01 <= row["tissue_fraction"] <= hi[k] + 0.01, (k, row["tissue_fraction"], lo[k], hi[k])
    assert rec.counts["tiles_written"] == t.height > 0
    # a rerun skips the tiled slide and says its mask was not needed
    from slidelake.pipeline import summary

    again = summary(run_all(spark, cfg))
    assert "masks: 0 computed, 0 reused, 0 failed, 1 not needed (slides already tiled)" in again.splitlines()


@pytest.mark.parametrize("order", ["b-first", "a-first"])
def test_same_content_under_two_paths_is_tiled_once_on_a_first_run(spark, lake, tmp_path, order):
    """Two files with the same bytes, given in either order to a fresh lake: both are
    ``slides`` rows with one ``slide_id``; the tiles are written once (the 4 x 3 grid of a
    512 x 384 px slide with 128 px tiles), from the lexicographically first path."""
    a, b = tmp_path / "a" / "slide.tiff", tmp_path / "b" / "slide.tiff"
    a.parent.mkdir(), b.parent.mkdir()
    make_tiff(a, 512, 384, tile=64)
    shutil.copy(a, b)
    inputs = [b, a] if order == "b-first" else [a, b]
    rec = run_all(spark, cfg_for(lake, inputs, resolution={"level": 0}, grid={"tile_extent": 128}))
    slides = pl.read_delta(str(lake / "slides"))
    assert slides.height == 2 and slides["slide_id"].n_unique() == 1
    t = tiles_of(lake)
    assert t.height == 4 * 3 == rec.counts["tiles_written"] == rec.counts["tiles_generated"]
    assert t.select("tile_x", "tile_y").is_duplicated().sum() == 0
    assert set(t["path"]) == {str(a)} and rec.counts["slides_tiled"] == 1
    assert pl.read_delta(str(lake / "run_slides")).height == 1
