"""Overlap maths against brute force, annotations against known polygons (no Spark)."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import shapely

from slidelake.annotations import AnnotationIndex, label_rule, load_annotations
from slidelake.overlap import (OVERLAP_INPUTS, ColumnCounts, OverlayIndex, SlideInputs,
                               fraction_map, make_overlap, slide_overlap, slide_runs,
                               summed_area_rows)


def inputs(pdf):
    """The :class:`SlideInputs` of grid rows of one slide (per-slide columns of :func:`grid_rows`)."""
    first = pdf.iloc[0]
    return SlideInputs(int(first.slide_width), int(first.slide_height), float(first.downsample),
                       first.get("overlay_path"), first.get("annotations_path"))


def overlap(pdf, tile_roi_wkt, label_min_fraction):
    """:func:`slide_overlap` on a pandas frame of grid rows, its output as pandas (maps as dicts)."""
    rows = pa.RecordBatch.from_pandas(pdf[list(OVERLAP_INPUTS)], preserve_index=False)
    return slide_overlap(rows, inputs(pdf), tile_roi_wkt, label_min_fraction).to_pandas(maps_as_pydicts="strict")


def brute_fraction(labels, ds, rect, value):
    """Covered area of ``value`` in a level-0 rect: the overlap of the rect with every pixel
    cell (product of the per-axis interval overlaps), summed directly; no summed-area table."""
    x0, y0, x1, y1 = rect
    h, w = labels.shape
    j, i = np.arange(w), np.arange(h)
    ox = np.clip(np.minimum(x1, (j + 1) * ds[0]) - np.maximum(x0, j * ds[0]), 0, None)
    oy = np.clip(np.minimum(y1, (i + 1) * ds[1]) - np.maximum(y0, i * ds[1]), 0, None)
    cell = np.outer(oy, ox)
    area = cell.sum()
    return float((cell * (labels == value)).sum() / area) if area else 0.0


def make_overlay(w, h):
    """Known shapes: a rectangle of label 255, a disc of label 7, background 0."""
    yy, xx = np.mgrid[0:h, 0:w]
    lab = np.zeros((h, w), np.uint8)
    lab[h // 5: h // 2, w // 6: (2 * w) // 3] = 255
    lab[(yy - 0.7 * h) ** 2 + (xx - 0.6 * w) ** 2 < (0.2 * min(w, h)) ** 2] = 7
    return lab


def grid_rows(W0, H0, downsample, extent, stride):
    """Tiles of a ``keep`` grid: every ``k * stride`` until one reaches the edge."""
    W, H = int(W0 // downsample), int(H0 // downsample)

    def starts(length):
        return [p for p in range(0, length, stride) if p == 0 or p - stride + extent < length]

    xs, ys = starts(W), starts(H)
    rows = []
    for ty in ys:
        for tx in xs:
            rows.append(dict(slide_id="s", tile_x=tx, tile_y=ty,
                             level0_x=int(np.floor(tx * downsample + 0.5)), level0_y=int(np.floor(ty * downsample + 0.5)),
                             valid_width=int(min(extent, W - tx)), valid_height=int(min(extent, H - ty)),
                             downsample=float(downsample), slide_width=W0, slide_height=H0))
    return pd.DataFrame(rows)


def test_summed_area_rows_count_pixels():
    """Any set of rows of each label's summed-area table, built in one pass without the full table."""
    rng = np.random.default_rng(1)
    m = rng.integers(0, 3, (613, 17)).astype(np.uint8)  # more rows than one strip
    full = {v: np.zeros((614, 18), np.int64) for v in (0, 1, 2)}
    for v in full:
        full[v][1:, 1:] = (m == v).cumsum(0).cumsum(1)
    for rows in (np.arange(614), np.array([0]), np.array([5, 6, 300, 301, 612, 613]), np.array([613])):
        got = summed_area_rows(m, [0, 1, 2], rows)
        for v in (0, 1, 2):
            assert got[v].dtype == np.int32 and got[v].shape == (len(rows), 18)
            np.testing.assert_array_equal(got[v], full[v][rows])
    assert got[1][0, -1] == (m == 1).sum()


def test_summed_area_rows_share_one_cursor_across_calls():
    """Calls in ascending row order continue one pass down the labels; a call for rows above
    the cursor starts again from row 0. Every call's rows are exact either way."""
    rng = np.random.default_rng(2)
    m = rng.integers(0, 2, (700, 23)).astype(np.uint8)
    full = {v: np.zeros((701, 24), np.int64) for v in (0, 1)}
    for v in full:
        full[v][1:, 1:] = (m == v).cumsum(0).cumsum(1)
    cursor = ColumnCounts(m, [0, 1])
    for rows in ([3, 4, 90], [90, 91, 400], [390, 520, 521], [10, 11], [600, 700]):
        rows = np.array(rows)
        got = summed_area_rows(m, [0, 1], rows, cursor)
        assert cursor.row == rows[0]  # the shared cursor stops at the call's first row
        for v in (0, 1):
            np.testing.assert_array_equal(got[v], full[v][rows])


def test_fraction_map_builds_maps_without_python_per_row():
    values = np.array([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    full = fraction_map(["a", "b", "c"], values)
    assert full.to_pylist() == [[("a", 0.25), ("b", 0.75), ("c", 0.0)], [("a", 0.0), ("b", 0.0), ("c", 1.0)]]
    sparse = fraction_map(["a", "b", "c"], values, values > 0)
    assert sparse.to_pylist() == [[("a", 0.25), ("b", 0.75)], [("c", 1.0)]]
    assert fraction_map(["a"], np.zeros((0, 1))).to_pylist() == []


@pytest.mark.parametrize("mask_wh,downsample,extent,stride", [
    ((61, 47), 1.0, 64, 64),      # overlay ~16.4 level-0 px per px, tiles at level 0
    ((61, 47), 4.0, 32, 24),      # overlapping tiles, 128 level-0 px, non-integer ratio
    ((250, 190), 2.0, 50, 50),    # overlay ~4 px per px
    ((1000, 770), 1.0, 16, 20),   # overlay finer than a tile pixel (ratio 1)
    ((37, 29), 3.3, 40, 40),      # odd everything
])
def test_overlay_fractions_equal_brute_force(mask_wh, downsample, extent, stride):
    W0, H0 = 1000, 770
    lab = make_overlay(*mask_wh)
    ds = (W0 / mask_wh[0], H0 / mask_wh[1])
    pdf = grid_rows(W0, H0, downsample, extent, stride)
    pdf["overlay_path"], pdf["annotations_path"] = None, None
    idx = OverlayIndex(lab, (W0, H0))
    x0 = pdf.level0_x.to_numpy(float)
    y0 = pdf.level0_y.to_numpy(float)
    x1 = np.minimum(x0 + pdf.valid_width * downsample, W0)
    y1 = np.minimum(y0 + pdf.valid_height * downsample, H0)
    got = idx.fractions(x0, y0, x1, y1)
    assert set(got) == {0, 7, 255}
    edge = (pdf.valid_width < extent) | (pdf.valid_height < extent)
    assert edge.any()  # keep-policy partial tiles are part of the check
    check = sorted(set(np.flatnonzero(edge.to_numpy())) | set(range(0, len(pdf), max(1, len(pdf) // 150))))
    for k in check:
        rect = (x0[k], y0[k], x1[k], y1[k])
        for v in (0, 7, 255):
            assert got[v][k] == pytest.approx(brute_fraction(lab, ds, rect, v), abs=1e-9)
    total = sum(got.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-9)


def test_slide_overlap_uses_overlay_file_and_tile_roi(tmp_path):
    from slidelake.overlays import write_overlay

    W0, H0 = 1000, 770
    lab = make_overlay(61, 47)
    path = str(tmp_path / "ov.tiff")
    write_overlay(path, lab, (8.0, 8.0))
    pdf = grid_rows(W0, H0, 2.0, 64, 64)
    pdf["overlay_path"], pdf["annotations_path"] = path, None
    ds = (W0 / 61, H0 / 47)
    full = overlap(pdf, None, 0.5)
    # a rectangular and a triangular tile ROI (tile px)
    rect = overlap(pdf, "POLYGON ((16 16, 48 16, 48 48, 16 48, 16 16))", 0.5)
    tri = overlap(pdf, "POLYGON ((0 0, 64 0, 0 64, 0 0))", 0.5)
    for k in range(len(pdf)):
        r = pdf.iloc[k]
        x1 = min(r.level0_x + r.valid_width * 2.0, W0)
        y1 = min(r.level0_y + r.valid_height * 2.0, H0)
        bf = 1 - brute_fraction(lab, ds, (r.level0_x, r.level0_y, x1, y1), 0)
        assert full.tissue_fraction.iloc[k] == pytest.approx(bf, abs=1e-9)
        assert full.overlay_fractions.iloc[k]["255"] == pytest.approx(
            brute_fraction(lab, ds, (r.level0_x, r.level0_y, x1, y1), 255), abs=1e-9)
        rx0, ry0 = r.level0_x + 32, r.level0_y + 32
        rx1, ry1 = min(r.level0_x + 96, x1), min(r.level0_y + 96, y1)
        if rx1 > rx0 and ry1 > ry0:
            assert rect.tissue_fraction.iloc[k] == pytest.approx(1 - brute_fraction(lab, ds, (rx0, ry0, rx1, ry1), 0), abs=1e-9)
    # triangle: compare with a fine supersampled estimate on tiles fully inside the slide
    inner = np.flatnonzero((pdf.valid_width == 64) & (pdf.valid_height == 64))
    for k in inner[::7]:
        r = pdf.iloc[k]
        yy, xx = np.mgrid[0:128, 0:128] + 0.5
        inside = xx + yy < 128
        cols = np.minimum(((r.level0_x + xx[inside]) / ds[0]).astype(int), 60)
        rows_ = np.minimum(((r.level0_y + yy[inside]) / ds[1]).astype(int), 46)
        est = (lab[rows_, cols] != 0).mean()
        assert tri.tissue_fraction.iloc[k] == pytest.approx(est, abs=0.02)
    assert (full.overlap_error.isna()).all()


def border_overlay(w, h):
    """Labels that touch the slide's border: 255 along the right and bottom edges, 7 in the
    top-left corner, 3 on the left edge, background 0 in the middle and at the top-right; the
    last column and the last row differ from their neighbours in places (a lookup one cell
    short of the edge gives another answer)."""
    lab = np.zeros((h, w), np.uint8)
    lab[:, w - w // 5:] = 255
    lab[h - h // 4:, :] = 255
    lab[: h // 3, : w // 4] = 7
    lab[h // 3: h - h // 4, :2] = 3
    lab[: h // 2, w - 1] = 3
    lab[h - 1, : w // 2] = 7
    return lab


@pytest.mark.parametrize("downsample,extent,stride,last", [
    (1.0, 64, 64, "keep"), (2.0, 50, 30, "keep"), (3.3, 40, 40, "shift"),
])
def test_edge_tiles_on_border_touching_labels_equal_brute_force(tmp_path, downsample, extent, stride, last):
    """Every label, background 0 included, on edge tiles when the labels touch the slide's
    border: partial ``keep`` tiles count only their in-slide area, ``shift`` tiles end at the
    edge; fractions of each label and the tissue fraction equal a brute-force sum."""
    from slidelake.overlays import write_overlay

    def starts(length):  # keep: until a tile reaches the edge; shift: the last one moved back inside
        if last == "keep":
            return [p for p in range(0, length, stride) if p == 0 or p - stride + extent < length]
        full = list(range(0, length - extent + 1, stride))
        return full + ([length - extent] if full[-1] + extent < length else [])

    W0, H0, mw, mh = 1000, 770, 57, 43
    lab = border_overlay(mw, mh)
    path = str(tmp_path / "border.tiff")
    write_overlay(path, lab, (8.0, 8.0))
    W, H = int(W0 // downsample), int(H0 // downsample)
    rows = [dict(slide_id="s", tile_x=tx, tile_y=ty, level0_x=int(np.floor(tx * downsample + 0.5)),
                 level0_y=int(np.floor(ty * downsample + 0.5)), valid_width=min(extent, W - tx),
                 valid_height=min(extent, H - ty), downsample=downsample, slide_width=W0, slide_height=H0,
                 overlay_path=path, annotations_path=None)
            for ty in starts(H) for tx in starts(W)]
    pdf = pd.DataFrame(rows)
    out = overlap(pdf, None, 0.5)
    ds = (W0 / mw, H0 / mh)
    last_x, last_y = pdf.tile_x.max(), pdf.tile_y.max()
    edge = np.flatnonzero(((pdf.tile_x == last_x) | (pdf.tile_y == last_y) | (pdf.tile_x == 0)).to_numpy())
    assert len(edge) > 4
    for k in edge:
        r = pdf.iloc[k]
        rect = (r.level0_x, r.level0_y, min(r.level0_x + r.valid_width * downsample, W0),
                min(r.level0_y + r.valid_height * downsample, H0))
        want = {v: brute_fraction(lab, ds, rect, v) for v in (0, 3, 7, 255)}
        got = out.overlay_fractions.iloc[k]
        assert set(got) == {"0", "3", "7", "255"}
        for v in want:
            assert got[str(v)] == pytest.approx(want[v], abs=1e-9), (k, v)
        assert out.tissue_fraction.iloc[k] == pytest.approx(1 - want[0], abs=1e-9)
    # the bottom-right tile lies on the 255 border: all tissue
    corner = np.flatnonzero(((pdf.tile_x == last_x) & (pdf.tile_y == last_y)).to_numpy())[0]
    assert out.overlay_fractions.iloc[corner]["255"] == pytest.approx(1.0)


def test_a_one_pixel_overlay_covers_the_whole_slide():
    idx = OverlayIndex(np.full((1, 1), 255, np.uint8), (1000, 770))
    got = idx.fractions(np.array([0.0, 990.0]), np.array([0.0, 700.0]), np.array([64.0, 1000.0]), np.array([64.0, 770.0]))
    assert set(got) == {255} and np.allclose(got[255], 1.0)


def test_polygon_fractions_equal_supersampling():
    """Label fractions of non-rectangular regions (triangles, a polygon across several labels,
    one outside the overlay, an empty one) against a dense point sample of each region, for
    every label: the exact cell-intersection areas, each label's area over the region's."""
    rng = np.random.default_rng(5)
    lab = rng.choice(np.array([0, 3, 255], np.uint8), size=(9, 13))
    W0, H0 = 1300, 900  # 100 level-0 px per overlay px
    idx = OverlayIndex(lab, (W0, H0))
    polys = np.array([shapely.Polygon([(0, 0), (430, 0), (0, 370)]),
                      shapely.Polygon([(120, 150), (980, 260), (700, 880), (260, 640)]),
                      shapely.Polygon([(1250, 820), (1300, 900), (1210, 900)]),
                      shapely.Polygon([(1400, 0), (1500, 0), (1500, 100)]),  # outside the slide
                      shapely.Polygon()], dtype=object)
    got = idx.polygon_fractions(polys)
    assert set(got) == {0, 3, 255}
    step = 2.5
    for k, poly in enumerate(polys[:3]):
        x0, y0, x1, y1 = poly.bounds
        xx, yy = np.meshgrid(np.arange(x0 + step / 2, x1, step), np.arange(y0 + step / 2, y1, step))
        inside = shapely.contains_xy(poly, xx, yy)
        values = lab[(yy[inside] // 100).astype(int), (xx[inside] // 100).astype(int)]
        for v in (0, 3, 255):
            assert got[v][k] == pytest.approx((values == v).mean(), abs=0.01), (k, v)
        assert sum(got[v][k] for v in got) == pytest.approx(1.0)
    for k in (3, 4):
        assert all(got[v][k] == 0 for v in got)


def test_class_fractions_list_only_the_classes_present(tmp_path):
    """A tile's ``class_fractions`` map has the classes it overlaps, no zero entries."""
    gj = tmp_path / "s.geojson"
    write_geojson(gj, [poly([[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]], "Tumor"),
                       poly([[150, 0], [200, 0], [200, 100], [150, 100], [150, 0]], "Stroma")])
    pdf = grid_rows(400, 100, 1.0, 100, 100)
    pdf["overlay_path"], pdf["annotations_path"] = None, str(gj)
    out = overlap(pdf, None, 0.5)
    assert out.class_fractions.tolist() == [{"Tumor": 1.0}, {"Stroma": 0.5}, {}, {}]
    assert out.annotated_fraction.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert out.label.tolist() == ["Tumor", "Stroma", None, None]


def test_missing_overlay_is_a_tile_error(tmp_path):
    pdf = grid_rows(400, 300, 1.0, 100, 100)
    pdf["overlay_path"], pdf["annotations_path"] = str(tmp_path / "gone.tiff"), None
    out = overlap(pdf, None, 0.5)
    assert out.overlap_error.str.contains("cannot read overlay").all()
    assert out.tissue_fraction.isna().all()


def write_geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def poly(coords, cls):
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {"objectType": "annotation", "classification": {"name": cls, "color": [255, 0, 0]}}}


def test_annotation_class_fractions_and_labels(tmp_path):
    gj = tmp_path / "slide.geojson"
    write_geojson(gj, [
        poly([[0, 0], [300, 0], [300, 200], [0, 200], [0, 0]], "Tumor"),          # rectangle
        poly([[100, 100], [400, 100], [400, 300], [100, 300], [100, 100]], "Tumor"),  # overlaps it
        poly([[500, 0], [800, 300], [500, 300], [500, 0]], "Stroma"),             # triangle
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ])
    classes = load_annotations(str(gj))
    assert list(classes) == ["Stroma", "Tumor"]
    idx = AnnotationIndex(classes)
    tiles = shapely.box([0, 200, 500, 600, 0], [0, 100, 0, 100, 400], [100, 300, 600, 700, 100], [100, 200, 100, 200, 500])
    per_class, annotated = idx.fractions(tiles)
    tumor = shapely.union_all([shapely.box(0, 0, 300, 200), shapely.box(100, 100, 400, 300)])
    stroma = shapely.Polygon([(500, 0), (800, 300), (500, 300)])
    for k, t in enumerate(tiles):
        assert per_class[k, 1] == pytest.approx(t.intersection(tumor).area / t.area)
        assert per_class[k, 0] == pytest.approx(t.intersection(stroma).area / t.area)
    # by hand: tile (0,0,100,100) is inside the tumour rectangle; (500,0,600,100) is half stroma
    assert per_class[0].tolist() == [0.0, 1.0]
    assert per_class[2, 0] == pytest.approx(0.5)
    assert annotated[4] == 0.0
    labels = label_rule(idx.names, per_class, 0.5)
    got = labels.to_pylist()
    assert (got[0], got[1], got[2], got[4]) == ("Tumor", "Tumor", "Stroma", None)


def test_slide_overlap_annotations_column(tmp_path):
    gj = tmp_path / "a.geojson"
    write_geojson(gj, [poly([[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]], "Tumor")])
    pdf = grid_rows(400, 300, 1.0, 100, 100)
    pdf["overlay_path"], pdf["annotations_path"] = None, str(gj)
    out = overlap(pdf, None, 0.5)
    inside = (pdf.tile_x < 200) & (pdf.tile_y < 200)
    assert out.label[inside].eq("Tumor").all() and out.label[~inside].isna().all()
    assert out.annotated_fraction[inside].eq(1.0).all()
    assert out.tissue_fraction.isna().all()


def test_slide_overlap_with_a_triangle_roi_on_overlay_and_annotations(tmp_path):
    """A non-rectangular tile ROI restricts both the overlay and the annotation fractions, on
    every tile, against a dense point sample of each tile's triangle; a second slide's
    annotations are its own (the per-task cache is keyed by file)."""
    from slidelake.overlays import write_overlay

    rng = np.random.default_rng(7)
    lab = rng.choice(np.array([0, 255], np.uint8), size=(15, 20))  # 20 level-0 px per overlay px
    ov = str(tmp_path / "ov.tiff")
    write_overlay(ov, lab, (8.0, 8.0))
    gj, other = tmp_path / "a.geojson", tmp_path / "b.geojson"
    write_geojson(gj, [poly([[0, 0], [250, 0], [250, 300], [0, 300], [0, 0]], "Tumor")])
    write_geojson(other, [poly([[0, 0], [400, 0], [400, 300], [0, 300], [0, 0]], "Stroma")])
    pdf = grid_rows(400, 300, 1.0, 100, 100)
    pdf["overlay_path"], pdf["annotations_path"] = ov, str(gj)
    out = overlap(pdf, "POLYGON ((0 0, 100 0, 0 100, 0 0))", 0.5)
    yy, xx = np.mgrid[0:100, 0:100] + 0.5
    inside = xx + yy < 100
    for k in range(len(pdf)):
        r = pdf.iloc[k]
        px, py = r.level0_x + xx[inside], r.level0_y + yy[inside]
        tissue = (lab[(py // 20).astype(int), (px // 20).astype(int)] == 255).mean()
        assert out.tissue_fraction.iloc[k] == pytest.approx(tissue, abs=0.01), k
        assert out.annotated_fraction.iloc[k] == pytest.approx((px < 250).mean(), abs=0.01), k
    pdf["annotations_path"] = str(other)
    assert set(overlap(pdf, None, 0.5).label) == {"Stroma"}


def test_zero_area_and_empty_batches():
    """A rectangle of zero area gets 0 for every label; an empty batch gets empty arrays; a
    batch of one row is one run."""
    idx = OverlayIndex(np.array([[0, 255], [255, 0]], np.uint8), (100, 100))
    got = idx.fractions(np.array([10.0, 0.0]), np.array([10.0, 0.0]), np.array([10.0, 50.0]), np.array([60.0, 50.0]))
    assert got[0].tolist() == [0.0, 1.0] and got[255].tolist() == [0.0, 0.0]
    empty = idx.fractions(*(np.zeros(0) for _ in range(4)))
    assert all(len(v) == 0 for v in empty.values())
    one = idx.fractions(np.array([60.0]), np.array([0.0]), np.array([100.0]), np.array([40.0]))
    assert one[255].tolist() == [1.0]
    assert slide_runs(pa.array(["a"])) == [(0, 1)] and slide_runs(pa.array([], pa.string())) == []
    assert slide_runs(pa.array(["a", "b"])) == [(0, 1), (1, 2)] and slide_runs(pa.array(["a", "a"])) == [(0, 2)]


def test_bad_geojson_is_a_tile_error(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    pdf = grid_rows(400, 300, 1.0, 100, 100)
    pdf["overlay_path"], pdf["annotations_path"] = None, str(bad)
    out = overlap(pdf, None, 0.5)
    assert out.overlap_error.str.contains("annotations").all()


def test_an_overlap_task_drops_the_overlays_it_loaded(tmp_path):
    """Overlays are loaded once per task and not kept by the idle worker afterwards. The stage
    function goes through cloudpickle as Spark ships it: a closure gets copies of the module
    globals it names, so the worker's real cache must be the one emptied."""
    from pyspark import cloudpickle

    from slidelake.overlays import write_overlay
    from slidelake.overlap import _OVERLAYS

    labels = np.zeros((40, 50), np.uint8)
    labels[10:30, 10:40] = 255
    path = tmp_path / "ov.tiff"
    write_overlay(str(path), labels, (8.0, 8.0))
    yy, xx = np.mgrid[0:1280:256, 0:1600:256]
    pdf = pd.DataFrame({
        "slide_id": "s", "level0_x": xx.ravel(), "level0_y": yy.ravel(), "tile_x": xx.ravel(), "tile_y": yy.ravel(),
        "valid_width": 256, "valid_height": 256, "downsample": 1.0, "slide_width": 1600, "slide_height": 1280,
        "overlay_path": str(path), "annotations_path": None,
    })
    _OVERLAYS.drop()
    shipped = cloudpickle.loads(cloudpickle.dumps(make_overlap({"s": inputs(pdf)}, None, 0.5)))
    task = shipped(iter([pa.RecordBatch.from_pandas(pdf.iloc[:15]), pa.RecordBatch.from_pandas(pdf.iloc[15:])]))
    first = next(task)
    assert len(_OVERLAYS.items) == 1  # loaded once, kept for the task's next batch
    rest = list(task)
    assert len(_OVERLAYS.items) == 0
    frac = pa.Table.from_batches([first, *rest]).column("tissue_fraction").to_numpy()
    assert len(frac) == 7 * 5 and frac.max() == 1.0 and frac.min() == 0.0


def test_the_stage_takes_a_batch_slide_by_slide(tmp_path):
    """A batch holding rows of several slides (one with an overlay, one with none, the first
    again) comes out in the same order with its input columns untouched, each run of rows
    measured against its own slide's overlay."""
    from slidelake.overlays import write_overlay

    lab = make_overlay(61, 47)
    path = str(tmp_path / "ov.tiff")
    write_overlay(path, lab, (8.0, 8.0))
    a = grid_rows(1000, 770, 2.0, 64, 64).assign(overlay_path=path, annotations_path=None)
    b = grid_rows(400, 300, 1.0, 100, 100).assign(slide_id="t", overlay_path=None, annotations_path=None)
    mixed = pd.concat([a.iloc[:20], b, a.iloc[20:]], ignore_index=True)
    mixed["attributes"] = [{"case": str(k)} for k in range(len(mixed))]
    batch = pa.RecordBatch.from_pandas(mixed, preserve_index=False)
    assert slide_runs(batch.column("slide_id")) == [(0, 20), (20, 20 + len(b)), (20 + len(b), len(mixed))]
    out = pa.Table.from_batches(list(make_overlap({"s": inputs(a), "t": inputs(b)}, None, 0.5)(iter([batch]))))
    assert out.num_rows == len(mixed)
    for name in batch.schema.names:
        assert out.column(name).combine_chunks().equals(batch.column(name)), name
    got = out.to_pandas(maps_as_pydicts="strict")
    alone = overlap(a, None, 0.5)
    in_a = got.slide_id == "s"
    np.testing.assert_allclose(got.tissue_fraction[in_a].to_numpy(), alone.tissue_fraction.to_numpy())
    assert got.overlay_fractions[in_a].tolist() == alone.overlay_fractions.tolist()
    assert got.tissue_fraction[~in_a].isna().all() and got.overlay_fractions[~in_a].isna().all()


def test_the_stage_passes_its_roi_label_rule_and_bounds_on(tmp_path):
    """``make_overlap`` gives each slide's rows the tile ROI, the label rule's minimum and the
    filter bounds it was built with: its output equals :func:`slide_overlap` with the same
    arguments, filtered by :func:`overlap_keep`."""
    from slidelake.filtering import overlap_keep

    gj = tmp_path / "a.geojson"
    write_geojson(gj, [poly([[0, 0], [160, 0], [160, 300], [0, 300], [0, 0]], "Tumor")])
    pdf = grid_rows(400, 300, 1.0, 100, 100).assign(overlay_path=None, annotations_path=str(gj))
    roi = "POLYGON ((0 0, 100 0, 0 100, 0 0))"
    batch = pa.RecordBatch.from_pandas(pdf[list(OVERLAP_INPUTS)], preserve_index=False)
    out = pa.Table.from_batches(list(make_overlap({"s": inputs(pdf)}, roi, 0.9, None, 0.3)(iter([batch]))))
    want = slide_overlap(batch, inputs(pdf), roi, 0.9)
    want = want.filter(overlap_keep(want, None, 0.3))
    assert out.num_rows == want.num_rows == 6  # tile columns 0 and 1 of each row
    for name in ("annotated_fraction", "label"):
        assert out.column(name).combine_chunks().equals(want.column(name)), name
    # with the ROI, the second column has 4,200 of its triangle's 5,000 px² annotated: 0.84 < 0.9, no label
    assert out.column("label").to_pylist() == ["Tumor", None] * 3


def test_filter_before_decode_keeps_passing_and_failed_tiles():
    """The overlap stage's filter: both bounds, nulls never pass, an overlap error always does."""
    from slidelake.filtering import overlap_keep
    from slidelake.overlap import OVERLAP_SCHEMA

    n = 6
    cols = {f.name: pa.nulls(n, f.type) for f in OVERLAP_SCHEMA}
    cols["tissue_fraction"] = pa.array([0.9, 0.2, None, 0.6, 0.1, 0.5])
    cols["annotated_fraction"] = pa.array([1.0, 1.0, 1.0, None, 0.0, 0.3])
    cols["overlap_error"] = pa.array([None, None, None, None, "overlay x: OSError", None])
    batch = pa.RecordBatch.from_arrays(list(cols.values()), schema=OVERLAP_SCHEMA)
    assert overlap_keep(batch, 0.5, None).to_pylist() == [True, False, False, True, True, True]
    assert overlap_keep(batch, None, 0.3).to_pylist() == [True, True, True, False, True, True]
    assert overlap_keep(batch, 0.5, 0.5).to_pylist() == [True, False, False, False, True, False]
    assert overlap_keep(batch, None, None).to_pylist() == [True] * n
    # in the stage: only passing rows come out
    lab = np.zeros((40, 50), np.uint8)
    lab[:, :25] = 255
    yy, xx = np.mgrid[0:1280:256, 0:1600:256]
    rows = pa.record_batch({"slide_id": ["s"] * xx.size, "level0_x": xx.ravel(), "level0_y": yy.ravel(),
                            "valid_width": np.full(xx.size, 256), "valid_height": np.full(xx.size, 256)})
    import tempfile

    from slidelake.overlays import write_overlay
    with tempfile.TemporaryDirectory() as tmp:
        write_overlay(f"{tmp}/ov.tiff", lab, (8.0, 8.0))
        stage = make_overlap({"s": SlideInputs(1600, 1280, 1.0, f"{tmp}/ov.tiff")}, None, 0.5, 0.5)
        out = pa.Table.from_batches(list(stage(iter([rows]))))
    # the left half of the slide (x < 800) is tissue: tiles at x 0-512 pass, 768 is 1/8 tissue
    assert sorted(set(out.column("level0_x").to_pylist())) == [0, 256, 512]
    assert out.num_rows == 3 * 5 and pc.min(out.column("tissue_fraction")).as_py() == 1.0
