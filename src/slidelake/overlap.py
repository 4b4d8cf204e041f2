"""Per-tile overlap with overlays and annotations, before any pixel is decoded.

Stage ``overlap`` (a ``mapInArrow`` over grid rows that takes each batch's rows slide by slide;
the input columns pass through untouched and the new columns are built from NumPy arrays,
with no Python per tile):
for every tile, the fraction of its area covered by each overlay label (``overlay_fractions``,
``{"0": 0.17, "255": 0.83}`` as ratiopath's ``tile_overlay_overlap``), the ``tissue_fraction``
(area under any non-zero label), the fraction covered by each annotation class
(``class_fractions``), the ``annotated_fraction`` and a ``label``.

The tile's area is the part of the tile inside the slide (partial ``keep`` edge tiles count
only their in-slide area), optionally restricted to ``grid.tile_roi``.

Exact overlay maths (:class:`OverlayIndex`): the overlay is piecewise constant over its pixels,
so the integral of a label's indicator over ``[0, u) x [0, v)`` is exactly the bilinear
interpolation of its summed-area table at integer corners. Covered areas of arbitrary
(sub-pixel) rectangles are therefore exact, whatever the ratio of tile to overlay
resolution, from four table lookups per rectangle: one vectorised pass per batch, which builds
only the table rows at the batch's rectangle edges.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
import shapely.affinity
import shapely.geometry
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from slidelake.annotations import AnnotationIndex, label_rule, load_annotations
from slidelake.filtering import overlap_keep
from slidelake.config import StorageConfig
from slidelake.memory import LRU, freeze_long_lived, peak_rss_mib, reset_peak_rss, trim_heap

OVERLAP_FIELDS = [
    T.StructField("overlay_fractions", T.MapType(T.StringType(), T.DoubleType()), True),
    T.StructField("tissue_fraction", T.DoubleType(), True),
    T.StructField("class_fractions", T.MapType(T.StringType(), T.DoubleType()), True),
    T.StructField("annotated_fraction", T.DoubleType(), True),
    T.StructField("label", T.StringType(), True),
    T.StructField("overlap_error", T.StringType(), True),
]
OVERLAP_SCHEMA = pa.schema([
    ("overlay_fractions", pa.map_(pa.string(), pa.float64())), ("tissue_fraction", pa.float64()),
    ("class_fractions", pa.map_(pa.string(), pa.float64())), ("annotated_fraction", pa.float64()),
    ("label", pa.string()), ("overlap_error", pa.string()),
])  # the Arrow types of OVERLAP_FIELDS


# ------------------------------------------------------------------------- overlay maths

STRIP_ROWS = 256  # overlay rows compared at once while summing columns (bounds the temporaries)


class ColumnCounts:
    """Per label value, the count of that value in each column of ``labels[:row]``: a cursor
    moved down the image once, so that a task's batches of tiles (raster order) share one pass.

    Args:
        labels: uint8 ``(h, w)``.
        values: the label values to count.
    """

    def __init__(self, labels: np.ndarray, values: list[int]) -> None:
        self.labels, self.values = labels, values
        h, w = labels.shape
        self.dtype = np.int32 if h * w < 2**31 else np.int64
        self.reset()

    def reset(self) -> None:
        """Back to row 0 (no rows counted)."""
        self.row = 0
        self.counts = {v: np.zeros(self.labels.shape[1], self.dtype) for v in self.values}

    def advance(self, row: int) -> None:
        """Count the label rows ``[self.row, row)`` (no-op when ``row <= self.row``)."""
        for y in range(self.row, row, STRIP_ROWS):
            band = self.labels[y:min(y + STRIP_ROWS, row)]
            for v in self.values:
                self.counts[v] += np.count_nonzero(band == v, axis=0).astype(self.dtype, copy=False)
        self.row = max(self.row, row)

    def copy(self) -> "ColumnCounts":
        """An independent cursor at the same row."""
        twin = copy.copy(self)  # shares the labels; the counts are its own
        twin.counts = {v: c.copy() for v, c in self.counts.items()}
        return twin


def summed_area_rows(labels: np.ndarray, values: list[int], rows: np.ndarray,
                     cursor: ColumnCounts | None = None) -> dict[int, np.ndarray]:
    """Rows ``rows`` of the summed-area table of each label value's indicator.

    The full table ``S_v`` of shape ``(h + 1, w + 1)`` has ``S_v[i, j]`` = number of pixels of
    ``labels[:i, :j]`` equal to ``v``; only the rows a batch of rectangles needs are built
    (``S_v[i] = [0, cumsum(column counts of labels[:i] == v)]``, one pass down the image), so
    memory follows the rectangles' distinct edges, not the overlay's size (4 bytes per overlay
    pixel and label for a full table: 62 MiB for a 100,000 x 80,000 px slide's binary mask).

    Args:
        labels: uint8 ``(h, w)``.
        values: the label values to count.
        rows: sorted, unique int indices in ``[0, h]``.
        cursor: a :class:`ColumnCounts` of ``labels`` kept between calls: it is moved to
            ``rows[0]`` (reset first when already past it) and the pass starts there, so calls
            for rows in ascending order cost one pass over the image in all. None: from row 0.

    Returns:
        ``{v: (len(rows), w + 1)}`` int32 tables (int64 when ``h * w`` does not fit int32).
    """
    rows = np.asarray(rows, np.int64)
    if cursor is None:
        cursor = ColumnCounts(labels, values)
    elif len(rows) and rows[0] < cursor.row:
        cursor.reset()
    if len(rows):
        cursor.advance(int(rows[0]))
    local = cursor.copy()
    tables = {v: np.zeros((len(rows), labels.shape[1] + 1), local.dtype) for v in values}
    for k, r in enumerate(rows.tolist()):
        local.advance(r)
        for v in values:
            np.cumsum(local.counts[v], out=tables[v][k, 1:])
    return tables


def cells(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, fraction)`` of coordinates ``x`` (overlay px, float) along an axis of ``size``
    px: ``x`` clipped to ``[0, size]``, ``index = min(floor(x), size - 1)`` (int64) and
    ``fraction = x - index``, the bilinear weights' position inside that cell."""
    x = np.clip(x, 0.0, size)
    i = np.minimum(np.floor(x).astype(np.int64), max(size - 1, 0))
    return i, x - i


def integral(table: np.ndarray, k: np.ndarray, fv: np.ndarray, j: np.ndarray, fu: np.ndarray) -> np.ndarray:
    """Integral of the image behind a summed-area table over ``[0, u) x [0, v)`` (overlay px).

    Exact for a piecewise-constant image: bilinear interpolation of the table at the integer
    corners around ``(u, v)``, given as :func:`cells` ``(j, fu)`` of ``u`` and ``(i, fv)`` of
    ``v``; ``table`` holds some rows of the full table (:func:`summed_area_rows`) and ``k`` is
    the position of row ``i`` among them (row ``i + 1`` must follow it).
    """
    return (table[k, j] * (1 - fu) * (1 - fv) + table[k, j + 1] * fu * (1 - fv)
            + table[k + 1, j] * (1 - fu) * fv + table[k + 1, j + 1] * fu * fv)


class OverlayIndex:
    """One overlay, indexed for exact per-rectangle label fractions.

    Args:
        labels: uint8 ``(h, w)`` label image covering the slide's level-0 extent.
        slide_size: ``(width0, height0)`` level-0 px; overlay px ``(i, j)`` covers level-0
            ``[j * ds_x, (j + 1) * ds_x) x [i * ds_y, (i + 1) * ds_y)``, ``ds = size0 / size``.
    """

    def __init__(self, labels: np.ndarray, slide_size: tuple[int, int]) -> None:
        self.labels_image = labels
        self.height, self.width = labels.shape
        self.ds_x = slide_size[0] / self.width
        self.ds_y = slide_size[1] / self.height
        self.values = [int(v) for v in np.unique(labels)]
        self.cursor = ColumnCounts(labels, self.values)

    def fractions(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> dict[int, np.ndarray]:
        """Fraction of each rectangle (level-0 px, float arrays) covered by each label value.

        Returns ``{label: float64 array}``; a rectangle of zero area gets 0 for every label.
        The summed-area table rows at the rectangles' edges are built per call
        (:func:`summed_area_rows`, memory bounded by the edges); calls in raster order (a
        task's batches) continue one pass down the labels.
        """
        u0, u1 = np.asarray(x0, float) / self.ds_x, np.asarray(x1, float) / self.ds_x
        v0, v1 = np.asarray(y0, float) / self.ds_y, np.asarray(y1, float) / self.ds_y
        area = np.clip(u1 - u0, 0, None) * np.clip(v1 - v0, 0, None)
        safe = np.where(area > 0, area, 1.0)
        # the corner cells of every rectangle, once for all labels
        (j0, fu0), (j1, fu1) = cells(u0, self.width), cells(u1, self.width)
        (i0, fv0), (i1, fv1) = cells(v0, self.height), cells(v1, self.height)
        rows = np.unique(np.concatenate([i0, i0 + 1, i1, i1 + 1]))  # the table rows the lookups need
        k0, k1 = np.searchsorted(rows, i0), np.searchsorted(rows, i1)
        out = {}
        for v, t in summed_area_rows(self.labels_image, self.values, rows, self.cursor).items():
            sums = (integral(t, k1, fv1, j1, fu1) - integral(t, k1, fv1, j0, fu0)
                    - integral(t, k0, fv0, j1, fu1) + integral(t, k0, fv0, j0, fu0))
            out[v] = np.where(area > 0, sums / safe, 0.0)
        return out

    def polygon_fractions(self, polys: np.ndarray) -> dict[int, np.ndarray]:
        """Fraction of each shapely polygon (level-0 px) covered by each label value, exactly,
        from the polygon's intersection areas with the overlay pixel cells it touches."""
        out = {v: np.zeros(len(polys)) for v in self.values}
        for n, poly in enumerate(polys):
            if poly is None or poly.is_empty or poly.area <= 0:
                continue
            bx0, by0, bx1, by1 = poly.bounds
            j0, j1 = max(0, math.floor(bx0 / self.ds_x)), min(self.width, math.ceil(bx1 / self.ds_x))
            i0, i1 = max(0, math.floor(by0 / self.ds_y)), min(self.height, math.ceil(by1 / self.ds_y))
            if j1 <= j0 or i1 <= i0:
                continue
            jj, ii = np.meshgrid(np.arange(j0, j1), np.arange(i0, i1))
            cells = shapely.box(jj * self.ds_x, ii * self.ds_y, (jj + 1) * self.ds_x, (ii + 1) * self.ds_y)
            weights = shapely.area(shapely.intersection(cells, poly))
            total = poly.area
            sub = self.labels_image[i0:i1, j0:j1]
            for v in self.values:
                out[v][n] = float(weights[sub == v].sum()) / total
        return out


# ------------------------------------------------------------------------- tile geometry

def tile_rects(level0_x, level0_y, valid_w, valid_h, downsample, slide_w, slide_h):
    """In-slide rectangles of tiles in level-0 px: ``(x0, y0, x1, y1)`` float arrays.

    ``valid_w/h`` are tile px inside the slide, ``downsample`` tile px -> level-0 px; the
    result is also clipped to the slide's level-0 size.
    """
    x0 = np.asarray(level0_x, float)
    y0 = np.asarray(level0_y, float)
    x1 = np.minimum(x0 + np.asarray(valid_w, float) * downsample, slide_w)
    y1 = np.minimum(y0 + np.asarray(valid_h, float) * downsample, slide_h)
    return x0, y0, x1, y1


def tile_geometries(x0, y0, x1, y1, downsample, tile_roi: Any | None) -> np.ndarray:
    """Tile regions as shapely geometries in level-0 px: the in-slide box, intersected with
    ``tile_roi`` (a geometry in tile px, origin at the tile's top-left) when given."""
    boxes = shapely.box(x0, y0, x1, y1)
    if tile_roi is None:
        return boxes
    out = np.empty(len(boxes), dtype=object)
    for k in range(len(boxes)):
        roi = shapely.affinity.affine_transform(tile_roi, [downsample[k], 0, 0, downsample[k], x0[k], y0[k]])
        out[k] = shapely.intersection(roi, boxes[k])
    return out


def roi_is_rect(tile_roi: Any | None) -> bool:
    """True when the tile ROI is None or an axis-aligned rectangle (the fast exact path)."""
    return tile_roi is None or tile_roi.equals(shapely.box(*tile_roi.bounds))


# ----------------------------------------------------------------------------- the stage

OVERLAP_INPUTS = ("slide_id", "level0_x", "level0_y", "valid_width", "valid_height")  # per-tile columns read


class SlideInputs(NamedTuple):
    """What the overlap stage needs of one slide, decided on the driver and shipped with the
    stage (so that the rows going to Python carry only per-tile columns).

    Attributes:
        width, height: level-0 size, px.
        downsample: tile px -> level-0 px.
        overlay_path: the slide's overlay (pyramidal TIFF), or None.
        annotations_path: the slide's GeoJSON annotations, or None.
        storage: how an ``s3://`` overlay is reached.
    """

    width: int
    height: int
    downsample: float
    overlay_path: str | None = None
    annotations_path: str | None = None
    storage: StorageConfig | None = None


_OVERLAYS = LRU(2)
_ANNOTATIONS = LRU(4)


def drop_task_caches() -> None:
    """Forget the overlays and annotations this worker loaded, and give the memory back to the
    OS (:func:`slidelake.memory.trim_heap`; the indexes are freed by their reference counts, so
    no ``gc.collect``, which took 35-80 ms per task); the overlap stage calls it when a task ends.

    An overlay index holds the slide's label image (1 byte per mask pixel), which an idle
    worker must not keep into the decode stage (``docs/benchmarks.md``). This is a module-level
    function on purpose: Spark ships the stage's closure by value (cloudpickle), with *copies*
    of the module globals the closure names, so clearing ``_OVERLAYS`` from inside the closure
    would clear a copy and leave the worker's cache full.
    """
    _OVERLAYS.drop()
    _ANNOTATIONS.drop()
    trim_heap()


def _load_overlay(path: str, size: tuple[int, int], storage: StorageConfig | None) -> OverlayIndex:
    from slidelake.overlays import read_overlay

    labels, _ = read_overlay(path, storage)
    return OverlayIndex(labels, size)


def fraction_map(keys: list[str], fractions: np.ndarray, present: np.ndarray | None = None) -> pa.MapArray:
    """An Arrow ``map<string, double>`` column from a float ``(n, len(keys))`` array, built with
    no per-row Python: row ``k`` maps ``keys[c]`` to ``fractions[k, c]`` for every column ``c``,
    or only where the bool ``(n, len(keys))`` ``present`` is true."""
    n, width = fractions.shape
    if present is None:
        counts = np.full(n, width, np.int64)
        rows, cols = np.divmod(np.arange(n * width), width)
    else:
        counts = present.sum(axis=1)
        rows, cols = np.nonzero(present)  # row-major: each row's entries in key order
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    names = pa.array(keys, pa.string()).take(pa.array(cols))
    return pa.MapArray.from_arrays(pa.array(offsets), names, pa.array(fractions[rows, cols], pa.float64()))


def slide_overlap(rows: pa.RecordBatch, slide: SlideInputs, tile_roi_wkt: str | None,
                  label_min_fraction: float) -> pa.RecordBatch:
    """Overlap columns (:data:`OVERLAP_SCHEMA`) for the tile rows of ONE slide.

    Args:
        rows: tile rows of one slide, with :data:`OVERLAP_INPUTS`.
        slide: that slide's size, downsample, overlay and annotations.
        tile_roi_wkt: ``grid.tile_roi`` (tile px) as WKT, or None.
        label_min_fraction: see :func:`label_rule`.

    Returns:
        One row per input row. The slide's overlay and annotations are read once per task
        (cached, dropped when the task ends) and every tile's fractions come from one vectorised
        pass. A slide without overlay gets null overlay columns; without annotations, null class
        columns. Read errors go to ``overlap_error`` (the rows are kept).
    """
    n = rows.num_rows
    W0, H0 = int(slide.width), int(slide.height)
    num = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in OVERLAP_INPUTS[1:]}
    ds = np.full(n, float(slide.downsample))
    x0, y0, x1, y1 = tile_rects(num["level0_x"], num["level0_y"], num["valid_width"], num["valid_height"], ds, W0, H0)
    roi = shapely.from_wkt(tile_roi_wkt) if tile_roi_wkt else None
    geoms = None
    if roi is not None:
        geoms = tile_geometries(x0, y0, x1, y1, ds, roi)
        if roi_is_rect(roi):  # rectangle ROI: exact SAT path on its clipped bounds
            b = shapely.bounds(geoms)
            empty = shapely.is_empty(geoms)
            x0, y0, x1, y1 = (np.where(empty, 0.0, b[:, k]) for k in range(4))
    out = {f.name: pa.nulls(n, f.type) for f in OVERLAP_SCHEMA}
    errors: list[str] = []
    opath = slide.overlay_path
    if opath:
        try:
            ov = _OVERLAYS.get((opath, W0, H0), lambda: _load_overlay(opath, (W0, H0), slide.storage))
            if roi is None or roi_is_rect(roi):
                fr = ov.fractions(x0, y0, x1, y1)
            else:
                fr = ov.polygon_fractions(geoms)
            table = np.column_stack([fr[v] for v in fr]) if fr else np.zeros((n, 0))
            out["overlay_fractions"] = fraction_map([str(v) for v in fr], table)
            background = fr.get(0, np.zeros(n))
            out["tissue_fraction"] = pa.array(np.clip(table.sum(axis=1) - background, 0.0, 1.0))
        except Exception as exc:  # noqa: BLE001 - recorded on every tile of the slide
            errors.append(f"overlay {opath}: {type(exc).__name__}: {exc}")
    apath = slide.annotations_path
    if apath:
        try:
            idx = _ANNOTATIONS.get(apath, lambda: AnnotationIndex(load_annotations(apath, slide.storage)))
            g = geoms if geoms is not None else shapely.box(x0, y0, x1, y1)
            per_class, annotated = idx.fractions(g)
            out["class_fractions"] = fraction_map(idx.names, per_class, per_class > 0)
            out["annotated_fraction"] = pa.array(annotated, pa.float64())
            out["label"] = label_rule(idx.names, per_class, label_min_fraction)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"annotations {apath}: {type(exc).__name__}: {exc}")
    if errors:
        out["overlap_error"] = pa.array(["; ".join(errors)] * n, pa.string())
    return pa.RecordBatch.from_arrays(list(out.values()), schema=OVERLAP_SCHEMA)


def slide_runs(slide_ids: pa.Array) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of equal consecutive ``slide_ids`` (a batch of grid rows
    holds each slide's rows together, in raster order)."""
    n = len(slide_ids)
    if n == 0:
        return []
    change = np.zeros(0, np.int64)
    if n > 1:
        differs = pc.not_equal(slide_ids.slice(1), slide_ids.slice(0, n - 1))
        change = np.flatnonzero(differs.to_numpy(zero_copy_only=False)) + 1
    bounds = [0, *change.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))


def make_overlap(slides: dict[str, SlideInputs], tile_roi_wkt: str | None, label_min_fraction: float,
                 min_tissue_fraction: float | None = None, min_annotated_fraction: float | None = None,
                 on_profile: Callable[[dict[str, float]], None] | None = None,
                 on_skipped: Callable[[dict[str, int]], None] | None = None,
                 ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Build the ``mapInArrow`` function of the overlap stage: each batch's rows, slide by
    slide (:func:`slide_runs`; ``slides`` gives each ``slide_id``'s inputs), get the
    :data:`OVERLAP_SCHEMA` columns, and the rows that pass the filter before decode
    (:func:`slidelake.filtering.overlap_keep` with the two bounds) go out, their input columns
    untouched. ``on_profile({"overlap.batch_s": s, "overlap.tiles": n,
    "overlap.worker_peak_mib": MiB})`` is called once per batch (tiles in, before the filter;
    the worker's peak resident set in this stage so far, :mod:`slidelake.memory`);
    ``on_skipped({slide_id: tiles})`` with the tiles the filter dropped (the live progress).
    Overlays and annotations are loaded once per task and dropped when it ends."""

    def overlap(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        freeze_long_lived()
        if on_profile is not None:
            reset_peak_rss()
        for batch in batches:
            t0 = time.perf_counter()
            ids = batch.column("slide_id")
            for start, stop in slide_runs(ids):
                rows = batch.slice(start, stop - start)
                extra = slide_overlap(rows, slides[ids[start].as_py()], tile_roi_wkt, label_min_fraction)
                keep = overlap_keep(extra, min_tissue_fraction, min_annotated_fraction)
                out = pa.RecordBatch.from_arrays(rows.columns + extra.columns,
                                                 schema=pa.schema(list(rows.schema) + list(OVERLAP_SCHEMA)))
                out = out.filter(keep)
                if on_skipped is not None and out.num_rows < rows.num_rows:
                    on_skipped({ids[start].as_py(): rows.num_rows - out.num_rows})
                if out.num_rows:
                    yield out
            if on_profile is not None:
                on_profile({"overlap.batch_s": time.perf_counter() - t0, "overlap.tiles": float(batch.num_rows),
                            "overlap.worker_peak_mib": peak_rss_mib()})
        # the overlay indexes serve this task's batches; an idle worker must not keep them
        drop_task_caches()

    return overlap


def overlap_tiles(tiles: DataFrame, slides: dict[str, SlideInputs], tile_roi_wkt: str | None,
                  label_min_fraction: float, min_tissue_fraction: float | None = None,
                  min_annotated_fraction: float | None = None,
                  on_profile: Callable[[dict[str, float]], None] | None = None,
                  on_skipped: Callable[[dict[str, int]], None] | None = None) -> DataFrame:
    """Add :data:`OVERLAP_FIELDS` to grid rows and keep those that pass the filter before
    decode (a ``mapInArrow`` stage, metadata only).

    Every column of ``tiles`` goes to Python and back, and every row that comes back: pass only
    per-tile columns (the JVM's Arrow conversion costs several µs per row and column; a slide's
    own columns are better joined back to the kept rows, as :func:`slidelake.pipeline.tile_slides`
    does), and filter here rather than after (``docs/benchmarks.md``).

    Args:
        tiles: grid rows with :data:`OVERLAP_INPUTS`, each slide's rows together in raster
            order (as :func:`slidelake.grid.expand_grid` makes them).
        slides: :class:`SlideInputs` per ``slide_id`` of ``tiles``.
        tile_roi_wkt: ``grid.tile_roi`` (tile px) or None.
        label_min_fraction: see :func:`label_rule`.
        min_tissue_fraction, min_annotated_fraction: ``filter`` bounds (None: not applied),
            see :func:`slidelake.filtering.overlap_keep`; both None keeps every row.
        on_profile, on_skipped: see :func:`make_overlap`.

    Returns:
        The kept rows plus ``overlay_fractions`` (label value as string -> fraction 0-1),
        ``tissue_fraction`` (0-1, area under non-zero labels), ``class_fractions`` (class name ->
        fraction, classes present only), ``annotated_fraction``, ``label``, ``overlap_error``.
    """
    schema = T.StructType(list(tiles.schema.fields) + OVERLAP_FIELDS)
    fn = make_overlap(slides, tile_roi_wkt, label_min_fraction, min_tissue_fraction, min_annotated_fraction, on_profile,
                      on_skipped)
    return tiles.mapInArrow(fn, schema=schema)


__all__ = [
    "OVERLAP_FIELDS", "ColumnCounts", "summed_area_rows", "cells", "integral", "OverlayIndex", "SlideInputs", "OVERLAP_INPUTS", "tile_rects",
    "tile_geometries", "roi_is_rect",
    "OVERLAP_SCHEMA", "fraction_map", "slide_overlap", "slide_runs", "make_overlap", "drop_task_caches", "overlap_tiles",
]
