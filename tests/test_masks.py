"""Tissue masks, overlays, mask-first tiling, annotations and labels."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import polars as pl
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv

from conftest import CMU, DAPI, TCGA, TRITC, corrupt_copy, make_tiff, need
from slidelake.config import MaskConfig, PipelineConfig
from slidelake.masks import compute_mask, params_hash, read_slide_at
from slidelake.overlays import read_overlay, write_overlay
from slidelake.qc import mask_outline
from slidelake.tissue import tissue_mask
from slidelake.pipeline import run_all, run_discover, run_masks
from slidelake.slides import probe_slide


# ------------------------------------------------------------------ masks of the real slides

def test_he_mask_is_plausible_and_its_outline_sits_on_tissue():
    need(CMU)
    slide = openslide.OpenSlide(str(CMU))
    W, H = slide.dimensions
    rgb, valid = read_slide_at(slide, (W // 4, H // 4))
    mask, info = tissue_mask(rgb, valid, 0.499 * 4, MaskConfig(mpp=2.0))
    assert info["polarity"] == "brightfield"
    frac = (mask > 0).mean()
    assert 0.15 < frac < 0.7  # a strip of skin on white glass
    sat = rgb2hsv(rgb)[..., 1]
    thr = info["thresholds"][0]
    inside, outside = sat[mask > 0], sat[mask == 0]
    assert np.median(inside) > thr > np.median(outside)
    assert inside.mean() > 10 * outside.mean()
    # just outside the outline is glass; on the outline the stain fades into it
    ring = ndimage.binary_dilation(mask > 0, iterations=2) & (mask == 0)
    outline = mask_outline(mask)
    assert np.median(sat[ring]) < thr / 2
    assert np.median(sat[ring]) < sat[outline].mean() < inside.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_outline_is_skimage_find_boundaries_inner(seed):
    """The outline (a SciPy erosion) marks the pixels scikit-image's ``find_boundaries(mode=
    "inner")`` does: on random blobs with holes that touch the image's edges, and on labels
    other than 255."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.random((120, 170)), 4) > 0.5
    labels = np.where(blobs, np.uint8(255), np.uint8(0))
    labels[:10, :] = 255  # touches the top edge
    labels[40:50, 60:70] = 7  # another label counts as tissue
    assert 0.1 < (labels > 0).mean() < 0.9
    np.testing.assert_array_equal(mask_outline(labels), find_boundaries(labels > 0, mode="inner"))
    assert mask_outline(labels).any() and not mask_outline(labels)[0, 50]  # the image edge is no outline


@pytest.mark.parametrize("path", [DAPI, TRITC], ids=["DAPI", "TRITC"])
def test_fluorescence_mask_is_not_trivial(path, tmp_path):
    need(path)
    cfg = MaskConfig()
    row = probe_slide(str(path))
    m = compute_mask(row, cfg, str(tmp_path), "run", params_hash(cfg))
    assert m["status"] == "ok", m["error"]
    assert m["polarity"] == "fluorescence"
    assert 0.5 < m["tissue_fraction"] < 0.95
    labels, _ = read_overlay(m["mask_path"])
    h, w = labels.shape
    # the black glass at the top-left corner is background, the section's middle is tissue
    assert (labels[: h // 20, : w // 20] == 0).all()
    assert (labels[h // 2 - 5: h // 2 + 5, w // 2 - 5: w // 2 + 5] == 255).all()
    # tissue is brighter than background in the slide itself
    thumb = np.asarray(Image.open(m["thumbnail_path"]).convert("RGB")).max(axis=2)
    assert np.median(thumb[labels > 0]) > 2 * max(1, np.median(thumb[labels == 0]))


def test_mask_tiff_reopens_at_recorded_mpp(tmp_path):
    need(CMU)
    cfg = MaskConfig(mpp=2.0)
    m = compute_mask(probe_slide(str(CMU)), cfg, str(tmp_path), "run", params_hash(cfg))
    assert m["status"] == "ok", m["error"]
    assert m["mask_width"] == round(2220 * 0.499 / 2.0) and m["mask_height"] == round(2967 * 0.499 / 2.0)
    assert m["mask_mpp_x"] == pytest.approx(2.0, rel=0.01)
    assert m["mask_downsample_x"] == pytest.approx(2220 / m["mask_width"])
    osr = openslide.OpenSlide(m["mask_path"])
    assert osr.dimensions == (m["mask_width"], m["mask_height"])
    assert osr.level_count >= 2  # pyramidal
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(m["mask_mpp_x"], rel=1e-6)
    assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(m["mask_mpp_y"], rel=1e-6)
    with tifffile.TiffFile(m["mask_path"]) as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        labels = page.asarray()
    assert set(np.unique(labels)) == {0, 255}
    assert labels.mean() / 255 == pytest.approx(m["tissue_fraction"])
    got, mpp = read_overlay(m["mask_path"])
    assert mpp == pytest.approx((m["mask_mpp_x"], m["mask_mpp_y"]), rel=1e-6)


class RecordingSlide:
    """Wraps an OpenSlide handle and records the size of every region read."""

    def __init__(self, slide):
        self.slide, self.sizes = slide, []
        self.dimensions, self.level_downsamples = slide.dimensions, slide.level_downsamples

    def get_best_level_for_downsample(self, d):
        return self.slide.get_best_level_for_downsample(d)

    def read_region(self, loc, level, size):
        self.sizes.append(size)
        return self.slide.read_region(loc, level, size)


def test_single_level_slide_is_read_in_bounded_regions(tmp_path):
    img = make_tiff(tmp_path / "big.tiff", 3000, 2000, levels=1, tile=128)
    rec = RecordingSlide(openslide.OpenSlide(str(tmp_path / "big.tiff")))
    rgb, valid = read_slide_at(rec, (300, 200), chunk_px=512)
    assert len(rec.sizes) > 4 and max(max(s) for s in rec.sizes) <= 512 + 10
    assert valid.all()
    whole = np.asarray(Image.fromarray(img).resize((300, 200), Image.Resampling.BOX)).astype(int)
    assert np.abs(rgb.astype(int) - whole).mean() < 3

    # regions read by several threads (the driver's spare cores) give the same pixels
    rec2 = RecordingSlide(openslide.OpenSlide(str(tmp_path / "big.tiff")))
    rgb3, valid3 = read_slide_at(rec2, (300, 200), chunk_px=512, threads=3)
    assert sorted(rec2.sizes) == sorted(rec.sizes)
    np.testing.assert_array_equal(rgb3, rgb)
    np.testing.assert_array_equal(valid3, valid)


def test_threaded_read_of_a_real_slide_is_the_same():
    need(CMU)
    slide = openslide.OpenSlide(str(CMU))
    W, H = slide.dimensions
    one = read_slide_at(slide, (W // 8, H // 8), chunk_px=256)
    two = read_slide_at(slide, (W // 8, H // 8), chunk_px=256, threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert one[1].all() and one[0].std() > 10  # a real picture, not a blank


def test_mask_read_from_stored_tiles_equals_read_region(tmp_path):
    """``masks.reader=auto`` reads the mask's level from the file's JPEG tiles: the same pixels
    and validity as ``read_region`` (real CMU sample, a generated JPEG pyramid read at level 1
    with edge regions), on 1 and 2 threads, without calling ``read_region`` at all; the masks
    made both ways are the same."""
    from slidelake.native import open_native

    need(CMU)
    jpeg = tmp_path / "jpeg.tiff"
    make_tiff(jpeg, 2500, 1700, levels=3, tile=128, compression="jpeg")

    class NoReadRegion:
        def __init__(self, osr):
            self.osr = osr

        def __getattr__(self, name):
            if name == "read_region":
                raise AssertionError("read_region called although the level is stored as JPEG tiles")
            return getattr(self.osr, name)

    for path, size in ((CMU, (555, 741)), (jpeg, (1000, 680))):
        osr = openslide.OpenSlide(str(path))
        native = open_native(str(path), cache_tiles=0)
        level = osr.get_best_level_for_downsample(min(osr.dimensions[0] / size[0], osr.dimensions[1] / size[1]))
        assert native.level(level) is not None and (path == CMU or level == 1)
        ref = read_slide_at(osr, size, chunk_px=256)
        for threads in (1, 2):
            got = read_slide_at(NoReadRegion(osr), size, chunk_px=256, threads=threads, native=native)
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
        assert ref[0].std() > 10
        native.close()
    rec = {**probe_slide(str(CMU)), "slide_id": "cmu", "path": str(CMU), "fingerprint": "f", "attributes": {}}
    rows = {reader: compute_mask(rec, MaskConfig(reader=reader), str(tmp_path / reader), "r", "p")
            for reader in ("auto", "openslide")}
    assert rows["auto"]["status"] == rows["openslide"]["status"] == "ok"
    assert rows["auto"]["tissue_fraction"] == rows["openslide"]["tissue_fraction"]
    np.testing.assert_array_equal(read_overlay(rows["auto"]["mask_path"])[0], read_overlay(rows["openslide"]["mask_path"])[0])


def test_mask_of_a_slide_with_corrupt_tiles_fails_as_with_openslide(tmp_path):
    """A corrupt stored JPEG tile under the mask's level is left to OpenSlide, which fails the
    read: the native read never turns a broken slide into a mask."""
    need(CMU)
    bad = corrupt_copy(CMU, tmp_path / "corrupt.svs")
    rec = {**probe_slide(str(bad)), "slide_id": "bad", "path": str(bad), "fingerprint": "f", "attributes": {}}
    cfg = {"mpp": 2.0, "chunk_px": 512}  # the mask read at level 0, where the tiles are broken
    rows = {reader: compute_mask(rec, MaskConfig(reader=reader, **cfg), str(tmp_path / reader), "r", "p")
            for reader in ("auto", "openslide")}
    assert rows["openslide"]["status"] == "error"
    assert rows["auto"]["status"] == "error" and str(bad) in rows["auto"]["error"]


# ----------------------------------------------------------------------- mask-first pipeline

def cfg_for(lake, inputs, **kw):
    base = {"inputs": [str(p) for p in inputs], "lake": str(lake), "decode": {"encoding": "raw"},
            "filter": {"max_background_fraction": None}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return PipelineConfig.model_validate(base)


pipeline = pytest.mark.spark


@pipeline
def test_mask_first_decodes_only_kept_tiles_and_matches_filtering_after_decode(spark, lake):
    need(CMU, DAPI, TCGA)
    first = cfg_for(lake, [CMU, DAPI, TCGA], filter={"min_tissue_fraction": 0.5})
    rec = run_all(spark, first)
    c = rec.counts
    assert c["masks_computed"] == 2 and c["masks_failed"] == 0
    assert [e["stage"] for e in rec.slide_errors] == ["resolution"]  # TCGA has no mpp: not tiled
    # the masks job on its own: the mpp-less slide gets a mask at a nominal 0.25 µm/px (said so),
    # a slide file gone since discovery gets an error row, and neither stops the other
    gone = lake.parent / "gone.svs"
    shutil.copy(CMU, gone)
    gone.write_bytes(gone.read_bytes()[:-1] + b"x")  # other content: another slide_id
    run_discover(spark, cfg_for(lake, [gone]))
    gone.unlink()
    rec_m = run_masks(spark, cfg_for(lake, []))
    assert rec_m.status == "succeeded"
    assert (rec_m.counts["masks_computed"], rec_m.counts["masks_reused"], rec_m.counts["masks_failed"]) == (1, 2, 1)
    assert [e["path"] for e in rec_m.slide_errors if e["stage"] == "masks"] == [str(gone)]
    tcga = pl.read_delta(str(lake / "masks")).filter(pl.col("path") == str(TCGA)).row(0, named=True)
    assert tcga["status"] == "ok" and tcga["mask_mpp_x"] is None and "no mpp" in tcga["algorithm"]
    assert 0.1 < tcga["tissue_fraction"] < 0.95
    kept = pl.read_delta(str(lake / "tiles"))
    assert c["tiles_decoded"] == c["tiles_written"] == kept.height > 0
    assert c["tiles_skipped"] == c["tiles_generated"] - c["tiles_decoded"] > 0
    assert (kept["tissue_fraction"] >= 0.5).all()
    # the same slides, every tile decoded, tissue fraction kept as a column, no mask filter
    after = cfg_for(lake, [CMU, DAPI], filter={"min_tissue_fraction": None}, tables={"tiles_table": "all_tiles"})
    rec2 = run_all(spark, after)
    assert rec2.counts["masks_reused"] == 2 and rec2.counts["masks_computed"] == 0
    every = pl.read_delta(str(lake / "all_tiles"))
    assert rec2.counts["tiles_decoded"] == every.height == rec2.counts["tiles_generated"]
    key = ["slide_id", "tile_x", "tile_y"]
    post = every.filter(pl.col("tissue_fraction") >= 0.5).select(key).sort(key)
    assert post.equals(kept.select(key).sort(key))
    both = kept.join(every, on=key, suffix="_all")
    assert (both["tissue_fraction"] == both["tissue_fraction_all"]).all()
    assert (both["tile"] == both["tile_all"]).all()
    # per-slide tissue fractions are plausible on both stains and the map sums to one
    per = every.group_by("slide_id").agg(pl.col("tissue_fraction").mean())
    assert per["tissue_fraction"].is_between(0.05, 0.98).all()
    sums = [sum(m.values()) for m in every["overlay_fractions"]]
    assert np.allclose(sums, 1.0)
    # the masks table and the QC pictures, redrawn with the kept tiles
    masks = pl.read_delta(str(lake / "masks"))
    assert masks.height == 4 and sorted(masks["status"].to_list()) == ["error", "ok", "ok", "ok"]
    for qc in masks.filter(pl.col("path").is_in([str(CMU), str(DAPI)]))["qc_path"]:
        pic = np.asarray(Image.open(qc).convert("RGB"))
        yellow = (pic[..., 0] == 255) & (pic[..., 1] == 200) & (pic[..., 2] == 0)
        green = (pic[..., 0] == 0) & (pic[..., 1] == 200) & (pic[..., 2] == 0)
        assert yellow.sum() > 100 and green.sum() > 100


@pipeline
def test_user_overlay_sidecar_and_geojson_annotations_from_manifest(spark, lake, tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    make_tiff(src / "gen.tiff", 1024, 768, levels=1, tile=64, mpp=0.5)
    # user overlay at 1/8 scale: left half tissue (255), a 'tumour' label 3 block, right half 0
    ov = np.zeros((96, 128), np.uint8)
    ov[:, :64] = 255
    ov[48:96, 64:96] = 3
    write_overlay(str(src / "gen.mask.tiff"), ov, (4.0, 4.0))
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [512, 0], [512, 256], [0, 256], [0, 0]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "Stroma"}},
         "geometry": {"type": "Polygon", "coordinates": [[[512, 512], [1024, 512], [1024, 768], [512, 768], [512, 512]]]}},
    ]}
    (tmp_path / "ann.geojson").write_text(json.dumps(gj))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,annotations_path,split,patient\n{src / 'gen.tiff'},{tmp_path / 'ann.geojson'},train,P7\n")
    # the folder walk must not take the sidecar for a slide
    from slidelake.slides import list_inputs

    assert list(list_inputs([str(src)], ["tiff"], True, ["*.mask.tiff"])["path"]) == [str(src / "gen.tiff")]

    cfg = cfg_for(lake, [manifest], resolution={"level": 0}, grid={"tile_extent": 128},
                  filter={"min_tissue_fraction": None})
    rec = run_all(spark, cfg)
    assert rec.status == "succeeded" and rec.counts["masks_failed"] == 0
    m = pl.read_delta(str(lake / "masks")).row(0, named=True)
    assert m["source"] == "user" and m["mask_path"] == str(src / "gen.mask.tiff")
    t = pl.read_delta(str(lake / "tiles")).sort(["tile_y", "tile_x"])
    assert t.height == 8 * 6
    for r in t.iter_rows(named=True):
        x, y = r["tile_x"], r["tile_y"]
        fr = r["overlay_fractions"]
        assert set(fr) == {"0", "3", "255"}
        want_tissue = 1.0 if x < 512 else (1.0 if (y >= 384 and x < 768) else 0.0)
        assert r["tissue_fraction"] == pytest.approx(want_tissue)
        assert fr["3"] == pytest.approx(1.0 if (x >= 512 and x < 768 and y >= 384) else 0.0)
        cls = r["class_fractions"] or {}
        if x < 512 and y < 256:
            assert cls == {"Tumor": 1.0} and r["label"] == "Tumor"
        elif x >= 512 and y >= 512:
            assert cls == {"Stroma": 1.0} and r["label"] == "Stroma"
        else:
            assert cls == {} and r["label"] is None
        assert r["split"] == "train" and r["attributes"]["patient"] == "P7" and "split" not in r["attributes"]
    # restricted to annotated regions, with the tissue filter on top
    cfg2 = cfg_for(lake, [manifest], resolution={"level": 0}, grid={"tile_extent": 128},
                   filter={"min_tissue_fraction": 0.5, "min_annotated_fraction": 0.5},
                   tables={"tiles_table": "annotated"})
    rec2 = run_all(spark, cfg2)
    a = pl.read_delta(str(lake / "annotated"))
    # Tumor: 4 x 2 tiles all tissue; Stroma: x 512-1023, y 512-767 = 4 x 2 tiles, tissue where x < 768
    assert sorted(a["label"].to_list()) == ["Stroma"] * 4 + ["Tumor"] * 8
    assert rec2.counts["tiles_decoded"] == 12 and rec2.counts["tiles_skipped"] == 48 - 12


@pipeline
def test_a_slide_split_over_grid_tasks_gives_the_same_tiles(spark, lake, tmp_path, monkeypatch):
    """A slide's grid split in bands of rows over several tasks (as large slides are) yields the
    same kept tiles, with the same fractions, as the grid in one task; none lost or doubled."""
    import slidelake.pipeline as pipeline_module

    make_tiff(tmp_path / "gen.tiff", 1024, 768, levels=1, tile=64, mpp=0.5)
    ov = np.zeros((96, 128), np.uint8)
    ov[10:70, 20:100] = 255  # tissue over part of the slide, edges inside tiles
    write_overlay(str(tmp_path / "gen.mask.tiff"), ov, (4.0, 4.0))
    kw = dict(resolution={"level": 0}, grid={"tile_extent": 96, "stride": 80}, filter={"min_tissue_fraction": 0.3})
    run_all(spark, cfg_for(lake, [tmp_path / "gen.tiff"], **kw))
    monkeypatch.setattr(pipeline_module, "GRID_TILES_PER_TASK", 12)  # 12 x 9 tiles (last=drop): a band per row
    rec = run_all(spark, cfg_for(lake, [tmp_path / "gen.tiff"], tables={"tiles_table": "banded"}, **kw))
    key = ["tile_x", "tile_y"]
    cols = key + ["tissue_fraction", "overlay_fractions", "level0_x", "valid_width", "path", "overlay_path", "tile"]
    one = pl.read_delta(str(lake / "tiles")).select(cols).sort(key)
    banded = pl.read_delta(str(lake / "banded")).select(cols).sort(key)
    assert rec.counts["tiles_generated"] == 12 * 9 and 0 < banded.height < 12 * 9
    assert banded.equals(one)
    assert banded.select(key).is_unique().all()
    assert (banded["overlay_path"] == str(tmp_path / "gen.mask.tiff")).all()


@pipeline
def test_one_slide_grid_is_spread_over_the_cores(spark, lake, tmp_path, monkeypatch):
    """A one-slide batch's grid goes to the grid + overlap stage in one band per core
    (``grid.band_tiles``; here with the minimum band size lowered to this small slide), and the
    kept tiles are those of the grid in one band."""
    import slidelake.pipeline as pipeline_module

    make_tiff(tmp_path / "gen.tiff", 1024, 768, levels=1, tile=64, mpp=0.5)
    ov = np.zeros((96, 128), np.uint8)
    ov[10:70, 20:100] = 255
    write_overlay(str(tmp_path / "gen.mask.tiff"), ov, (4.0, 4.0))
    kw = dict(resolution={"level": 0}, grid={"tile_extent": 96, "stride": 80}, filter={"min_tissue_fraction": 0.3})
    run_all(spark, cfg_for(lake, [tmp_path / "gen.tiff"], **kw))  # 108 tiles < the minimum band: one band
    per_band = []
    real = pipeline_module.expand_grid

    def spy(*args):
        per_band.append(args[-1])
        return real(*args)

    monkeypatch.setattr(pipeline_module, "expand_grid", spy)
    monkeypatch.setattr(pipeline_module, "GRID_TILES_PER_TASK_MIN", 1)
    run_all(spark, cfg_for(lake, [tmp_path / "gen.tiff"], tables={"tiles_table": "spread"}, **kw))
    cores = spark.sparkContext.defaultParallelism
    assert per_band == [-(-108 // cores)]  # 12 x 9 grid tiles over the cores (2 in the test session)
    key = ["tile_x", "tile_y"]
    cols = key + ["tissue_fraction", "overlay_fractions", "level0_x", "valid_width", "path", "tile"]
    one = pl.read_delta(str(lake / "tiles")).select(cols).sort(key)
    spread = pl.read_delta(str(lake / "spread")).select(cols).sort(key)
    assert 0 < spread.height < 108 and spread.equals(one)


@pipeline
def test_a_slide_whose_mask_fails_is_not_tiled_and_the_others_are(spark, lake, tmp_path):
    """Tiles carry the overlay path of their slide's committed mask; a slide whose mask fails
    (over ``masks.max_megapixels``) is left out of the plan, and the other slide of the batch
    is tiled in full."""
    d = tmp_path / "in"
    d.mkdir()
    make_tiff(d / "good.tiff", 600, 400, levels=1, tile=64, mpp=0.5)
    kw = dict(resolution={"level": 0}, grid={"tile_extent": 100}, filter={"min_tissue_fraction": None})
    rec = run_all(spark, cfg_for(lake, [d], **kw))
    assert rec.status == "succeeded" and rec.counts["masks_computed"] == 1
    m = pl.read_delta(str(lake / "masks")).row(0, named=True)
    assert os.path.isfile(m["mask_path"])
    t = pl.read_delta(str(lake / "tiles"))
    assert t.height == 6 * 4 and (t["overlay_path"] == m["mask_path"]).all()
    make_tiff(d / "absurd.tiff", 300, 200, mpp=400.0, seed=3)
    rec = run_all(spark, cfg_for(lake, [d], masks={"max_megapixels": 1.0}, tables={"tiles_table": "again"}, **kw))
    assert rec.status == "succeeded" and rec.counts["masks_failed"] == 1
    assert [e["stage"] for e in rec.slide_errors] == ["masks"]
    again = pl.read_delta(str(lake / "again"))
    assert set(again["path"]) == {str(d / "good.tiff")} and again.height == 6 * 4


@pipeline
def test_a_tiling_run_draws_each_new_masks_qc_picture_once_and_also_when_it_fails(spark, lake, tmp_path, monkeypatch):
    """In a tiling run the masks stage leaves the QC picture to the end of the run, where it is
    drawn once with the kept tiles; a run that fails after its masks were committed still leaves
    each new mask's picture (outline, no tiles) at its ``qc_path``."""
    from slidelake.qc import qc_picture as real_qc_picture
    import slidelake.masks as masks_module
    import slidelake.qc as qc_module
    from slidelake.pipeline import ConfigMismatchError

    drawn = []

    def counting(rgb, mask, tiles=None, **kw):
        drawn.append(0 if tiles is None else len(tiles))
        return real_qc_picture(rgb, mask, tiles, **kw)

    monkeypatch.setattr(masks_module, "qc_picture", counting)
    monkeypatch.setattr(qc_module, "qc_picture", counting)

    def yellow_green(path):
        pic = np.asarray(Image.open(path).convert("RGB"))
        return (((pic[..., 0] == 255) & (pic[..., 1] == 200) & (pic[..., 2] == 0)).sum(),
                ((pic[..., 0] == 0) & (pic[..., 1] == 200) & (pic[..., 2] == 0)).sum())

    def slide(path, seed):  # white glass, a block of stained-looking texture in the middle
        img = np.full((800, 1200, 3), 245, np.uint8)
        rng = np.random.default_rng(seed)
        img[200:600, 300:900] = rng.integers(0, 60, (400, 600, 3)) + np.array([150, 40, 120], np.uint8)
        tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4),
                         resolutionunit="CENTIMETER")

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    slide(a / "a.tiff", 1)
    slide(b / "b.tiff", 2)
    kw = dict(resolution={"level": 0}, filter={"min_tissue_fraction": None})
    rec = run_all(spark, cfg_for(lake, [a], grid={"tile_extent": 100}, **kw))
    assert rec.status == "succeeded" and rec.counts["masks_computed"] == 1
    assert drawn == [rec.counts["tiles_written"]] and drawn[0] > 0  # one picture, with the tiles
    drawn.clear()
    mask_a = pl.read_delta(str(lake / "masks")).row(0, named=True)
    yellow, green = yellow_green(mask_a["qc_path"])
    assert yellow > 100 and green > 100
    # drawn from the rectangles the write tasks reported: the same picture as from the table's rows
    from_tasks = np.asarray(Image.open(mask_a["qc_path"]))
    t = pl.read_delta(str(lake / "tiles"))
    ds = t["downsample"].to_numpy()
    x0, y0 = t["level0_x"].to_numpy(), t["level0_y"].to_numpy()
    from_table = np.stack([x0, y0, x0 + np.round(t["valid_width"].to_numpy() * ds),
                           y0 + np.round(t["valid_height"].to_numpy() * ds)], axis=1)
    qc_module.draw_qc({mask_a["slide_id"]: mask_a}, {mask_a["slide_id"]: from_table})
    np.testing.assert_array_equal(np.asarray(Image.open(mask_a["qc_path"])), from_tasks)
    # another slide with another tile size into the same table: refused after its mask is made
    drawn.clear()
    with pytest.raises(ConfigMismatchError):
        run_all(spark, cfg_for(lake, [b], grid={"tile_extent": 200}, **kw))
    m = pl.read_delta(str(lake / "masks")).filter(pl.col("path") == str(b / "b.tiff")).row(0, named=True)
    assert m["status"] == "ok" and drawn == [0]
    yellow, green = yellow_green(m["qc_path"])
    assert yellow == 0 and green > 100
    runs = pl.read_delta(str(lake / "runs")).sort("started_at")
    assert runs["status"].to_list() == ["succeeded", "failed"]


@pytest.mark.parametrize("method,threshold", [("grayscale", "multi_otsu"), ("grayscale", "otsu"), ("saturation", 0.1)])
def test_threshold_variants_agree_on_the_he_sample(method, threshold):
    need(CMU)
    slide = openslide.OpenSlide(str(CMU))
    rgb, valid = read_slide_at(slide, (2220 // 8, 2967 // 8))
    cfg = MaskConfig(mpp=4.0, method=method, threshold=threshold)
    mask, info = tissue_mask(rgb, valid, 0.499 * 8, cfg)
    ref, _ = tissue_mask(rgb, valid, 0.499 * 8, MaskConfig(mpp=4.0))
    assert len(info["thresholds"]) == (2 if threshold == "multi_otsu" else 1)
    if not isinstance(threshold, str):
        assert info["thresholds"] == [0.1] and info["algorithm"].endswith(":fixed")
    a, b = mask > 0, ref > 0
    assert 0.15 < a.mean() < 0.7
    assert (a & b).sum() / (a | b).sum() > 0.7  # the variants find the same tissue


def test_saturation_feature_is_hsv_saturation():
    """The mask's saturation feature is computed from channel planes (far less memory than
    ``rgb2hsv``) and equals skimage's HSV saturation."""
    from skimage.color import rgb2hsv

    from slidelake.tissue import _feature

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    rgb[:4] = 0  # black: saturation 0, no division by zero
    rgb[4:8] = 200  # grey: saturation 0
    got = _feature(rgb, "saturation", "brightfield")
    assert got.dtype == np.float32  # 4 bytes per mask pixel
    np.testing.assert_allclose(got, rgb2hsv(rgb)[..., 1], rtol=0, atol=1e-7)  # float32 rounding of values in [0, 1]
    assert (got[:8] == 0).all()
    np.testing.assert_allclose(_feature(rgb, "grayscale", "brightfield"), 255 - rgb.mean(axis=2), rtol=0, atol=3e-5)
    np.testing.assert_array_equal(_feature(rgb, "saturation", "fluorescence"), rgb.max(axis=2))


def test_masks_made_on_the_driver_equal_masks_made_by_spark(spark, tmp_path):
    """One slide's mask is made on the driver (``masks.on_driver_below``, no Spark job); the
    executors' path gives the same row and the same overlay pixels."""
    need(CMU)
    rows, labels = {}, {}
    for where, below in (("driver", 2), ("executors", 0)):
        cfg = PipelineConfig(inputs=[str(CMU)], lake=str(tmp_path / where), masks={"on_driver_below": below})
        run_discover(spark, cfg)
        rec = run_masks(spark, cfg)
        assert rec.counts["masks_computed"] == 1
        m = pl.read_delta(str(tmp_path / where / "masks")).row(0, named=True)
        assert m["status"] == "ok" and m["mask_path"].startswith(str(tmp_path / where))
        rows[where], labels[where] = m, read_overlay(m["mask_path"])[0]
    same = ("slide_id", "params_hash", "mask_width", "mask_height", "read_level", "algorithm", "polarity",
            "thresholds", "tissue_fraction", "source")
    assert {k: rows["driver"][k] for k in same} == {k: rows["executors"][k] for k in same}
    np.testing.assert_array_equal(labels["driver"], labels["executors"])
    assert 0.15 < rows["driver"]["tissue_fraction"] < 0.7


def test_masks_of_several_slides_on_driver_threads(tmp_path):
    """With ``masks.on_driver_below`` raised, several slides' masks are made on driver threads:
    one row per slide in input order, an error row for a broken slide, one profile call each."""
    need(CMU)
    from slidelake.masks import compute_masks_on_driver

    make_tiff(tmp_path / "gen.tiff", 1200, 900, levels=2, mpp=2.0)
    rows = [probe_slide(str(CMU)), probe_slide(str(tmp_path / "gen.tiff"))]
    broken = dict(rows[1], slide_id="broken", path=str(tmp_path / "missing.tiff"))
    figures = []
    made = compute_masks_on_driver(rows + [broken], MaskConfig(), str(tmp_path / "lake"), "run", figures.append)
    assert [m["slide_id"] for m in made] == [rows[0]["slide_id"], rows[1]["slide_id"], "broken"]
    assert [m["status"] for m in made] == ["ok", "ok", "error"] and "missing image file" in made[2]["error"]
    assert made[2]["error"].endswith(f"({tmp_path / 'missing.tiff'})")  # the message says which file
    assert all(os.path.isfile(m["mask_path"]) for m in made[:2])
    assert len(figures) == 3 and all(f["masks.slides"] == 1 and "masks.worker_peak_mib" not in f for f in figures)


def test_small_components_and_holes_are_removed_as_skimage_does():
    """``remove_small_components`` (strip-wise, 4 bytes per pixel) clears exactly what skimage's
    ``remove_small_objects`` clears, and on the inverted image fills what ``remove_small_holes`` fills."""
    from skimage import morphology

    from slidelake.tissue import remove_small_components

    rng = np.random.default_rng(11)
    fg = ndimage.binary_opening(rng.random((700, 530)) > 0.55)  # blobs of many sizes, touching the edges
    for max_px in (0, 1, 5, 40, 300):
        want = morphology.remove_small_objects(fg, max_size=max_px)
        got = remove_small_components(fg.copy(), max_px)
        np.testing.assert_array_equal(got, want)
        holes = ~remove_small_components(~fg, max_px)
        np.testing.assert_array_equal(holes, morphology.remove_small_holes(fg, max_size=max_px))
    assert remove_small_components(np.zeros((40, 30), bool), 10).sum() == 0
    assert 0 < remove_small_components(fg.copy(), 40).sum() < fg.sum()  # the case above removes something


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_from_the_strip_histogram_equal_skimage_on_the_values(seed):
    """The histogram is built strip by strip over slide pixels only; Otsu and multi-Otsu on it
    give exactly skimage's thresholds of the values themselves."""
    from skimage import filters

    from slidelake.tissue import _valid_histogram

    rng = np.random.default_rng(seed)
    h, w = 613, 411  # not a multiple of the strip height
    feat = (rng.random((h, w)) ** (0.5 + seed)).astype(np.float32) * 7.0
    feat[: h // 3] *= 0.25
    valid = rng.random((h, w)) > 0.2
    counts, centers = _valid_histogram(feat, valid)
    values = feat[valid]
    assert counts.sum() == values.size
    assert filters.threshold_otsu(hist=(counts, centers)) == filters.threshold_otsu(values)
    np.testing.assert_array_equal(filters.threshold_multiotsu(hist=(counts / counts.sum(), centers), classes=3),
                                  filters.threshold_multiotsu(values, classes=3))
    assert _valid_histogram(feat, np.zeros_like(valid)) is None
    assert _valid_histogram(np.full((20, 10), 3.0, np.float32), np.ones((20, 10), bool)) == 3.0


def test_tissue_mask_memory_is_a_few_bytes_per_mask_pixel():
    """The mask's working set is what bounds the masks stage on a gigapixel slide (a 100,000 x
    80,000 px slide has a 3,125 x 2,500 px mask at 8 µm/px). Its allocations beyond the inputs
    stay under 12 bytes per mask pixel (float32 feature, bool masks, int32 labels; it was ~40 with
    float64 features and skimage's copies), with slide pixels missing and every variant."""
    import tracemalloc

    rng = np.random.default_rng(1)
    h, w = 600, 800
    rgb = np.full((h, w, 3), 230, np.uint8)
    rgb[100:400, 150:600] = rng.integers(60, 200, (300, 450, 3), dtype=np.uint8)
    valid = np.ones((h, w), bool)
    valid[:, -50:] = False
    for cfg in (MaskConfig(), MaskConfig(method="grayscale", threshold="multi_otsu"), MaskConfig(polarity="fluorescence")):
        tissue_mask(rgb[:64, :64], valid[:64, :64], 8.0, cfg)  # imports and footprints outside the measure
        tracemalloc.start()
        try:
            mask, _ = tissue_mask(rgb, valid, 8.0, cfg)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert 0.1 < (mask > 0).mean() < 0.9
        assert peak < 12 * h * w, f"{cfg.method}/{cfg.polarity}: {peak / (h * w):.1f} bytes per mask pixel"


def test_qc_picture_in_place_draws_on_the_thumbnail():
    from slidelake.qc import qc_picture

    rgb = np.full((300, 400, 3), 240, np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[100:200, 150:250] = 255
    copy = qc_picture(rgb, mask, max_side=400)
    assert (rgb == 240).all()  # the default leaves the thumbnail alone
    same = qc_picture(rgb, mask, max_side=400, inplace=True)
    assert same is rgb
    np.testing.assert_array_equal(same, copy)
    assert (same[mask_outline(mask)] == (0, 200, 0)).all() and (same[150, 200] == 240).all()


def test_label_and_macro_images_never_reach_the_lake(spark, lake):
    """CMU carries a label and a macro image (they can show a patient's name or barcode): no
    code path reads associated images, and no image the run writes has their size."""
    need(CMU)
    src = Path(__file__).resolve().parents[1] / "src" / "slidelake"
    assert not [p.name for p in src.glob("*.py") if "associated_images" in p.read_text()]
    with openslide.OpenSlide(str(CMU)) as s:
        forbidden = {s.associated_images[k].size for k in ("label", "macro")}
    rec = run_all(spark, cfg_for(lake, [CMU], resolution={"level": 0}, grid={"tile_extent": 256}))
    assert rec.status == "succeeded" and rec.counts["masks_computed"] == 1

    written = [p for p in lake.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff")]
    assert len(written) >= 3  # mask overlay, thumbnail, QC picture
    for p in written:
        with Image.open(p) as im:
            assert im.size not in forbidden, p


def test_qc_of_a_dim_fluorescence_slide_is_contrast_stretched():
    """A dark fluorescence thumbnail (tissue at grey 20-40 on black) becomes legible in its QC
    picture: the tissue is spread over the upper half of 0-255, the glass stays dark; tiles are outlines, so
    the tissue inside them keeps its pixels. A brightfield thumbnail is drawn as it is."""
    from slidelake.qc import qc_picture

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 6, (200, 300, 3), dtype=np.uint8)
    rgb[50:150, 100:250, 1] = rng.integers(20, 41, (100, 150), dtype=np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    mask[50:150, 100:250] = 255
    tiles = np.array([[120.0, 70.0, 180.0, 130.0]])
    pic = qc_picture(rgb, mask, tiles, max_side=300, polarity="fluorescence")
    inner = pic[80:120, 130:170, 1]  # tissue inside the tile's outline, away from every line
    assert inner.min() >= 100 and inner.max() == 255 and np.median(inner) > 5 * np.median(rgb[80:120, 130:170, 1])
    assert np.median(pic[:40, :80].max(axis=2)) < 40  # the glass stays dark
    assert (pic[70, 120:180] == (255, 200, 0)).all()  # the tile's top edge, outlined
    plain = qc_picture(rgb, mask, tiles, max_side=300, polarity="brightfield")
    assert np.array_equal(plain[80:120, 130:170], rgb[80:120, 130:170])
