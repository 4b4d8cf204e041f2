"""Grid expansion: one metadata row per tile, made by Spark ``sequence`` + ``explode``.

Along one axis of length ``L`` (tile px), with tile extent ``E`` and stride ``S`` (overlap =
``E - S``; ``S > E`` leaves gaps), tile ``k`` starts at ``k * S``. The edge policy ``last``
(as ratiopath's ``grid_tiles``) decides what happens at the far edge:

* ``drop``: only tiles that fit, ``n = floor((L - E) / S) + 1`` (0 when ``L < E``);
* ``keep``: also partial tiles, until the edge is covered:
  ``n = min(ceil(L / S), ceil((L - E) / S) + 1)`` (1 when ``L <= E``); pixels past the slide
  are padded white by the decode stage;
* ``shift``: the tiles of ``keep``, with a partial last tile moved back to start at ``L - E``
  (clamped inside the slide, overlapping its neighbour); nothing when ``L < E``.

Tile positions are in px at the tile resolution; level-0 positions are
``floor(x * downsample + 0.5)`` (round half up).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from slidelake.rows import ResolvedSlide
from slidelake.spark import local_frame


def axis_count(length: int, extent: int, stride: int, last: str) -> int:
    """Number of tiles along one axis (formulas in the module docstring).

    Raises:
        ValueError: unknown ``last`` or non-positive extent/stride.
    """
    if extent < 1 or stride < 1:
        raise ValueError("extent and stride must be >= 1")
    if length <= 0:
        return 0
    full = (length - extent) // stride + 1 if length >= extent else 0
    if last == "drop":
        return full
    if last == "keep":
        if length <= extent:
            return 1
        return min(math.ceil(length / stride), math.ceil((length - extent) / stride) + 1)
    if last == "shift":
        return axis_count(length, extent, stride, "keep") if length >= extent else 0
    raise ValueError(f"unknown edge policy last={last!r}")


def _position_sql(k: str, n: str, length: str, extent: int, stride: int, last: str) -> str:
    """Spark SQL of the start (tile px) of tile ``k`` of ``n`` along an axis of ``length``: ``k *
    stride``, the last tile moved back to ``length - extent`` with ``shift`` (module docstring)."""
    pos = f"({k} * {int(stride)})"
    if last == "shift":
        pos = f"CASE WHEN {k} = {n} - 1 AND {pos} + {int(extent)} > {length} THEN {length} - {int(extent)} ELSE {pos} END"
    return f"CAST({pos} AS BIGINT)"


# the columns expand_grid makes per tile (besides slide_id)
TILE_COLUMNS = ("tile_row", "tile_col", "tile_x", "tile_y", "level0_x", "level0_y", "valid_width", "valid_height")


def grid_constants(tile_extent: tuple[int, int], stride: tuple[int, int]) -> dict[str, Column]:
    """The columns of a grid that are the same for every tile, ``tile_extent_x/y`` and
    ``stride_x/y`` (int literals, tile px), for ``DataFrame.withColumns``."""
    return {"tile_extent_x": F.lit(int(tile_extent[0])), "tile_extent_y": F.lit(int(tile_extent[1])),
            "stride_x": F.lit(int(stride[0])), "stride_y": F.lit(int(stride[1]))}


def expand_grid(spark: SparkSession, slides: list[ResolvedSlide], tile_extent: tuple[int, int], stride: tuple[int, int],
                last: str, roi: tuple[int, int, int, int] | None = None, tiles_per_band: int | None = None,
                ) -> DataFrame:
    """Explode slides into tile rows (metadata only, no pixels), in raster order per slide.

    Each slide's grid window and shape are computed here (:func:`grid_window`,
    :func:`axis_count`); Spark makes the rows with ``sequence`` + ``explode``. With
    ``tiles_per_band`` a slide's grid is split in bands of whole grid rows of about that many
    tiles (:func:`row_bands`), one input row each: Spark spreads the input rows over up to
    ``defaultParallelism`` tasks, so a large slide's grid (and the overlap after it) runs on
    every core. The input rows are held in the plan (:func:`slidelake.spark.local_frame`).

    Args:
        spark: the session.
        slides: dicts with ``slide_id``, ``extent_x``, ``extent_y`` (slide size in tile px) and
            ``downsample`` (tile px -> level-0 px).
        tile_extent: ``(x, y)`` tile size in tile px.
        stride: ``(x, y)`` step in tile px.
        last: edge policy ``keep`` | ``drop`` | ``shift``.
        roi: optional ``(x, y, width, height)`` in level-0 px; the grid covers that rectangle
            (clipped to the slide) instead of the whole slide.
        tiles_per_band: grid tiles per input row (None: one row per slide).

    Returns:
        ``slide_id`` and :data:`TILE_COLUMNS`: ``tile_x``, ``tile_y`` (top-left, tile px),
        ``level0_x``, ``level0_y`` (level-0 px), ``valid_width``, ``valid_height`` (tile px inside
        the slide; less than the extent only for ``keep`` edge tiles), ``tile_col``,
        ``tile_row`` (grid indices).

    Raises:
        ValueError: unknown ``last`` or non-positive extent/stride.
    """
    ex, ey = int(tile_extent[0]), int(tile_extent[1])
    sx, sy = int(stride[0]), int(stride[1])
    bands = []
    for r in slides:
        x0, y0, lx, ly = grid_window(r["extent_x"], r["extent_y"], r["downsample"], roi)
        nx, ny = axis_count(lx, ex, sx, last), axis_count(ly, ey, sy, last)
        if nx and ny:
            bands += [(r["slide_id"], r["extent_x"], r["extent_y"], float(r["downsample"]), x0, y0, lx, ly, nx, ny,
                       b0, b1) for b0, b1 in (row_bands(ny, nx * ny, tiles_per_band) if tiles_per_band else [(0, ny)])]
    rows = local_frame(spark, bands, T.StructType.fromDDL(
        "slide_id string, extent_x long, extent_y long, downsample double, x0 long, y0 long, lx long, ly long, "
        "nx long, ny long, band_start long, band_stop long"))
    E = F.expr
    out = (rows.withColumn("tile_row", E("explode(sequence(band_start, band_stop - 1))"))
           .withColumn("tile_col", E("explode(sequence(CAST(0 AS BIGINT), nx - 1))"))
           .withColumns({"tile_x": E("x0 + " + _position_sql("tile_col", "nx", "lx", ex, sx, last)),
                         "tile_y": E("y0 + " + _position_sql("tile_row", "ny", "ly", ey, sy, last))}))
    return out.select(
        "slide_id", "tile_row", "tile_col", "tile_x", "tile_y",
        E("CAST(FLOOR(tile_x * downsample + 0.5) AS BIGINT)").alias("level0_x"),
        E("CAST(FLOOR(tile_y * downsample + 0.5) AS BIGINT)").alias("level0_y"),
        E(f"CAST(LEAST(CAST({ex} AS BIGINT), extent_x - tile_x) AS INT)").alias("valid_width"),
        E(f"CAST(LEAST(CAST({ey} AS BIGINT), extent_y - tile_y) AS INT)").alias("valid_height"))


def level0_rects(tiles: Any) -> np.ndarray:
    """The in-slide rectangles of tile rows, int32 ``(n, 4)`` of ``(x0, y0, x1, y1)`` in level-0
    px: ``x0 = level0_x``, ``x1 = x0 + round(valid_width * downsample)`` (the part of the tile
    inside the slide; the same for y).

    Args:
        tiles: a ``pyarrow.Table`` (or record batch) with ``level0_x``, ``level0_y``,
            ``valid_width``, ``valid_height`` and ``downsample``.
    """
    def col(name: str) -> np.ndarray:
        return tiles.column(name).to_numpy(zero_copy_only=False)

    x0, y0, ds = col("level0_x"), col("level0_y"), col("downsample")
    return np.stack([x0, y0, x0 + np.rint(col("valid_width") * ds), y0 + np.rint(col("valid_height") * ds)],
                    axis=1).astype(np.int32)


def row_bands(grid_rows: int, grid_tiles: int, tiles_per_band: int) -> list[tuple[int, int]]:
    """Split a slide's grid of ``grid_rows`` tile rows (``grid_tiles`` tiles in all) into
    contiguous ``[start, stop)`` bands of whole rows, about ``tiles_per_band`` tiles each (at
    least one row per band, one band when the grid is small): the ``row_band`` of
    :func:`expand_grid`."""
    if grid_rows <= 0:
        return [(0, 0)]
    n = max(1, min(grid_rows, math.ceil(grid_tiles / max(1, tiles_per_band))))
    edges = [round(k * grid_rows / n) for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def band_tiles(batch_tiles: int, parallelism: int, most: int, least: int) -> int:
    """Grid tiles per band (:func:`row_bands`) for a batch of ``batch_tiles`` grid tiles on
    ``parallelism`` cores: the batch spread evenly over the cores, ``ceil(batch_tiles /
    parallelism)``, in bands of at least ``least`` tiles (a smaller band's task costs more to
    start than its overlap work) and at most ``most`` (a large slide's grid in several waves of
    tasks). So one slide of a few ten thousand tiles on 2 cores is two bands, and its grid and
    overlap run on both cores instead of one (``docs/benchmarks.md``: that stage
    0.10 s instead of 0.14 s on the benchmark slide; warm runs 2.94 against 3.04 s, medians of 20
    alternated pairs).

    Returns:
        Tiles per band, >= 1.
    """
    return max(1, min(most, max(least, math.ceil(batch_tiles / max(1, parallelism)))))


def grid_window(extent_x: int, extent_y: int, downsample: float,
                roi: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """``(x0, y0, width, height)`` in tile px of the part of a slide (``extent_x`` x
    ``extent_y`` tile px) the grid covers: the whole slide, or the ``roi`` ``(x, y, width,
    height)`` in level-0 px, outward to whole tile px (``floor`` of the start, ``ceil`` of the
    end, ``/ downsample``) and clipped to the slide."""
    if roi is None:
        return 0, 0, int(extent_x), int(extent_y)
    rx, ry, rw, rh = (float(v) for v in roi)
    x0, y0 = min(math.floor(rx / downsample), extent_x), min(math.floor(ry / downsample), extent_y)
    x1, y1 = min(math.ceil((rx + rw) / downsample), extent_x), min(math.ceil((ry + rh) / downsample), extent_y)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def grid_shape(extent_x: int, extent_y: int, downsample: float, tile_extent: tuple[int, int],
               stride: tuple[int, int], last: str, roi: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
    """``(columns, rows)`` of the grid :func:`expand_grid` makes for one slide."""
    _, _, lx, ly = grid_window(extent_x, extent_y, downsample, roi)
    return axis_count(lx, tile_extent[0], stride[0], last), axis_count(ly, tile_extent[1], stride[1], last)


def grid_size(extent_x: int, extent_y: int, downsample: float, tile_extent: tuple[int, int],
              stride: tuple[int, int], last: str, roi: tuple[int, int, int, int] | None = None) -> int:
    """Number of tiles :func:`expand_grid` makes for one slide (computed without Spark)."""
    nx, ny = grid_shape(extent_x, extent_y, downsample, tile_extent, stride, last, roi)
    return nx * ny
