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


def axis_positions(length: int, extent: int, stride: int, last: str) -> np.ndarray:
    """Start positions (int64, tile px) of the tiles along one axis, ascending.

    Raises:
        ValueError: as :func:`axis_count`.
    """
    n = axis_count(length, extent, stride, last)
    pos = np.arange(n, dtype=np.int64) * stride
    if last == "shift" and n and pos[-1] + extent > length:
        pos[-1] = length - extent
    return pos


def _count_sql(length: str, extent: int, stride: int, last: str) -> str:
    """Spark SQL of :func:`axis_count` over the column ``length`` (SQL text: building the same
    expression from ``Column`` objects costs hundreds of Py4J round trips, ~0.4 s per batch)."""
    L, E, S = length, int(extent), int(stride)
    full = f"CASE WHEN {L} >= {E} THEN FLOOR(({L} - {E}) / {S}) + 1 ELSE 0 END"
    keep = f"CASE WHEN {L} <= {E} THEN 1 ELSE LEAST(CEIL({L} / {S}), CEIL(({L} - {E}) / {S}) + 1) END"
    if last == "drop":
        n = full
    elif last == "keep":
        n = keep
    elif last == "shift":
        n = f"CASE WHEN {L} >= {E} THEN {keep} ELSE 0 END"
    else:
        raise ValueError(f"unknown edge policy last={last!r}")
    return f"CAST(CASE WHEN {L} > 0 THEN {n} ELSE 0 END AS BIGINT)"


def _position_sql(k: str, n: str, length: str, extent: int, stride: int, last: str) -> str:
    """Spark SQL of the start of tile ``k`` of ``n`` along an axis (as :func:`axis_positions`)."""
    pos = f"({k} * {int(stride)})"
    if last == "shift":
        pos = f"CASE WHEN {k} = {n} - 1 AND {pos} + {int(extent)} > {length} THEN {length} - {int(extent)} ELSE {pos} END"
    return f"CAST({pos} AS BIGINT)"


TILE_COLUMNS = (
    "tile_row", "tile_col", "tile_x", "tile_y", "level0_x", "level0_y", "valid_width", "valid_height",
)  # the columns expand_grid adds that vary from tile to tile
CONSTANT_COLUMNS = ("tile_extent_x", "tile_extent_y", "stride_x", "stride_y")  # the same for every tile
GRID_COLUMNS = TILE_COLUMNS + CONSTANT_COLUMNS  # every column expand_grid adds to the slides' columns


def grid_constants(tile_extent: tuple[int, int], stride: tuple[int, int]) -> dict[str, Column]:
    """The :data:`CONSTANT_COLUMNS` of a grid (int literals, tile px), for
    ``DataFrame.withColumns``."""
    return {"tile_extent_x": F.lit(int(tile_extent[0])), "tile_extent_y": F.lit(int(tile_extent[1])),
            "stride_x": F.lit(int(stride[0])), "stride_y": F.lit(int(stride[1]))}


def expand_grid(
    slides: DataFrame,
    tile_extent: tuple[int, int],
    stride: tuple[int, int],
    last: str,
    roi: tuple[int, int, int, int] | None = None,
    row_band: tuple[str, str] | None = None,
) -> DataFrame:
    """Explode resolved slides into tile rows (metadata only, no pixels).

    Args:
        slides: one row per slide with at least ``extent_x``, ``extent_y`` (slide size in tile
            px) and ``downsample`` (tile px -> level-0 px).
        tile_extent: ``(x, y)`` tile size in tile px.
        stride: ``(x, y)`` step in tile px.
        last: edge policy ``keep`` | ``drop`` | ``shift``.
        roi: optional ``(x, y, width, height)`` in level-0 px; the grid covers that rectangle
            (clipped to the slide) instead of the whole slide.
        row_band: optional names of two int columns ``(start, stop)``: an input row then makes
            only the grid rows ``tile_row`` in ``[start, stop)`` of its slide, so that several
            input rows of one slide (:func:`row_bands`) split its grid over several tasks.

    Returns:
        The input columns plus ``tile_x``, ``tile_y`` (top-left, tile px), ``level0_x``,
        ``level0_y`` (level-0 px), ``tile_extent_x/y``, ``stride_x/y``, ``valid_width``,
        ``valid_height`` (tile px inside the slide; less than the extent only for ``keep`` edge
        tiles), ``tile_col``, ``tile_row`` (grid indices).

    Raises:
        ValueError: unknown ``last``.
    """
    ex, ey = int(tile_extent[0]), int(tile_extent[1])
    sx, sy = int(stride[0]), int(stride[1])
    W, H = "CAST(extent_x AS BIGINT)", "CAST(extent_y AS BIGINT)"
    if roi is None:
        x0, y0, x1, y1 = "CAST(0 AS BIGINT)", "CAST(0 AS BIGINT)", W, H
    else:
        rx, ry, rw, rh = (float(v) for v in roi)
        x0 = f"CAST(LEAST(FLOOR({rx!r} / downsample), {W}) AS BIGINT)"
        y0 = f"CAST(LEAST(FLOOR({ry!r} / downsample), {H}) AS BIGINT)"
        x1 = f"CAST(LEAST(CEIL({rx + rw!r} / downsample), {W}) AS BIGINT)"
        y1 = f"CAST(LEAST(CEIL({ry + rh!r} / downsample), {H}) AS BIGINT)"
    E = F.expr
    out = (
        slides.withColumns({"_x0": E(x0), "_y0": E(y0), "_lx": E(f"{x1} - {x0}"), "_ly": E(f"{y1} - {y0}")})
        .withColumns({"_nx": E(_count_sql("_lx", ex, sx, last)), "_ny": E(_count_sql("_ly", ey, sy, last))})
        .where("_nx > 0 AND _ny > 0")
        .withColumns({"_r0": E(f"CAST(GREATEST({row_band[0]}, 0) AS BIGINT)" if row_band else "CAST(0 AS BIGINT)"),
                      "_r1": E(f"CAST(LEAST({row_band[1]}, _ny) AS BIGINT)" if row_band else "_ny")})
        .where("_r1 > _r0")
        .withColumn("tile_row", E("explode(sequence(_r0, _r1 - 1))"))
        .withColumn("tile_col", E("explode(sequence(CAST(0 AS BIGINT), _nx - 1))"))
    )
    out = out.withColumns({
        "tile_x": E("_x0 + " + _position_sql("tile_col", "_nx", "_lx", ex, sx, last)),
        "tile_y": E("_y0 + " + _position_sql("tile_row", "_ny", "_ly", ey, sy, last)),
    }).withColumns({
        "level0_x": E("CAST(FLOOR(tile_x * downsample + 0.5) AS BIGINT)"),
        "level0_y": E("CAST(FLOOR(tile_y * downsample + 0.5) AS BIGINT)"),
        **grid_constants((ex, ey), (sx, sy)),
        "valid_width": E(f"CAST(LEAST(CAST({ex} AS BIGINT), {W} - tile_x) AS INT)"),
        "valid_height": E(f"CAST(LEAST(CAST({ey} AS BIGINT), {H} - tile_y) AS INT)"),
    })
    return out.drop("_x0", "_y0", "_lx", "_ly", "_nx", "_ny", "_r0", "_r1")


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


def banded_grid(spark: SparkSession, slides: list[dict], tile_extent: tuple[int, int], stride: tuple[int, int],
                last: str, roi: tuple[int, int, int, int] | None, tiles_per_task: int) -> DataFrame:
    """The grid rows of ``slides`` with only ``slide_id`` and :data:`TILE_COLUMNS`, each slide's
    grid split in bands of about ``tiles_per_task`` tiles (:func:`row_bands`), one input row per
    band: Spark spreads the input rows over up to ``defaultParallelism`` tasks, so a large
    slide's grid and overlap run on every core.

    Args:
        slides: dicts with ``slide_id``, ``extent_x``, ``extent_y`` (tile px) and ``downsample``.
        tile_extent, stride, last, roi: as :func:`expand_grid`.
        tiles_per_task: grid tiles per band.
    """
    bands = []
    for r in slides:
        nx, ny = grid_shape(r["extent_x"], r["extent_y"], r["downsample"], tile_extent, stride, last, roi)
        bands += [(r["slide_id"], r["extent_x"], r["extent_y"], r["downsample"], b0, b1)
                  for b0, b1 in row_bands(ny, nx * ny, tiles_per_task)]
    # in the plan: the grid tasks start no Python worker to read their bands
    rows = local_frame(spark, bands, T.StructType.fromDDL(
        "slide_id string, extent_x long, extent_y long, downsample double, band_start long, band_stop long"))
    return expand_grid(rows, tile_extent, stride, last, roi, row_band=("band_start", "band_stop")).select(
        "slide_id", *TILE_COLUMNS)


def grid_shape(extent_x: int, extent_y: int, downsample: float, tile_extent: tuple[int, int],
               stride: tuple[int, int], last: str, roi: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
    """``(columns, rows)`` of the grid :func:`expand_grid` makes for one slide (without Spark)."""
    x0, y0, x1, y1 = 0, 0, extent_x, extent_y
    if roi is not None:
        rx, ry, rw, rh = roi
        x0, y0 = min(math.floor(rx / downsample), extent_x), min(math.floor(ry / downsample), extent_y)
        x1, y1 = min(math.ceil((rx + rw) / downsample), extent_x), min(math.ceil((ry + rh) / downsample), extent_y)
    return axis_count(x1 - x0, tile_extent[0], stride[0], last), axis_count(y1 - y0, tile_extent[1], stride[1], last)


def grid_size(extent_x: int, extent_y: int, downsample: float, tile_extent: tuple[int, int],
              stride: tuple[int, int], last: str, roi: tuple[int, int, int, int] | None = None) -> int:
    """Number of tiles :func:`expand_grid` makes for one slide (computed without Spark)."""
    nx, ny = grid_shape(extent_x, extent_y, downsample, tile_extent, stride, last, roi)
    return nx * ny
