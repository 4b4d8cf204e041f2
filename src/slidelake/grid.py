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

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F


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


def _count_expr(length: Column, extent: Column, stride: Column, last: str) -> Column:
    full = F.when(length >= extent, F.floor((length - extent) / stride) + 1).otherwise(F.lit(0))
    keep = F.when(length <= extent, F.lit(1)).otherwise(
        F.least(F.ceil(length / stride), F.ceil((length - extent) / stride) + 1)
    )
    if last == "drop":
        n = full
    elif last == "keep":
        n = keep
    elif last == "shift":
        n = F.when(length >= extent, keep).otherwise(F.lit(0))
    else:
        raise ValueError(f"unknown edge policy last={last!r}")
    return F.when(length > 0, n).otherwise(F.lit(0)).cast("long")


def _position_expr(k: Column, n: Column, length: Column, extent: Column, stride: Column, last: str) -> Column:
    pos = k * stride
    if last == "shift":
        pos = F.when((k == n - 1) & (pos + extent > length), length - extent).otherwise(pos)
    return pos.cast("long")


def expand_grid(
    slides: DataFrame,
    tile_extent: tuple[int, int],
    stride: tuple[int, int],
    last: str,
    roi: tuple[int, int, int, int] | None = None,
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

    Returns:
        The input columns plus ``tile_x``, ``tile_y`` (top-left, tile px), ``level0_x``,
        ``level0_y`` (level-0 px), ``tile_extent_x/y``, ``stride_x/y``, ``valid_width``,
        ``valid_height`` (tile px inside the slide; less than the extent only for ``keep`` edge
        tiles), ``tile_col``, ``tile_row`` (grid indices).
    """
    ex, ey = int(tile_extent[0]), int(tile_extent[1])
    sx, sy = int(stride[0]), int(stride[1])
    d = F.col("downsample")
    W, H = F.col("extent_x").cast("long"), F.col("extent_y").cast("long")
    if roi is None:
        x0, y0, x1, y1 = F.lit(0).cast("long"), F.lit(0).cast("long"), W, H
    else:
        rx, ry, rw, rh = roi
        x0 = F.least(F.floor(F.lit(rx) / d), W).cast("long")
        y0 = F.least(F.floor(F.lit(ry) / d), H).cast("long")
        x1 = F.least(F.ceil(F.lit(rx + rw) / d), W).cast("long")
        y1 = F.least(F.ceil(F.lit(ry + rh) / d), H).cast("long")
    Lx, Ly = x1 - x0, y1 - y0
    E_x, E_y, S_x, S_y = F.lit(ex), F.lit(ey), F.lit(sx), F.lit(sy)
    # withColumns: one projection per step (each withColumn call is analysed on its own)
    out = (
        slides.withColumns({"_x0": x0, "_y0": y0, "_lx": Lx, "_ly": Ly})
        .withColumns({"_nx": _count_expr(F.col("_lx"), E_x, S_x, last),
                      "_ny": _count_expr(F.col("_ly"), E_y, S_y, last)})
        .where((F.col("_nx") > 0) & (F.col("_ny") > 0))
        .withColumn("tile_row", F.explode(F.sequence(F.lit(0).cast("long"), F.col("_ny") - 1)))
        .withColumn("tile_col", F.explode(F.sequence(F.lit(0).cast("long"), F.col("_nx") - 1)))
    )
    tx = F.col("_x0") + _position_expr(F.col("tile_col"), F.col("_nx"), F.col("_lx"), E_x, S_x, last)
    ty = F.col("_y0") + _position_expr(F.col("tile_row"), F.col("_ny"), F.col("_ly"), E_y, S_y, last)
    out = out.withColumns({"tile_x": tx, "tile_y": ty}).withColumns({
        "level0_x": F.floor(F.col("tile_x") * d + 0.5).cast("long"),
        "level0_y": F.floor(F.col("tile_y") * d + 0.5).cast("long"),
        "tile_extent_x": F.lit(ex), "tile_extent_y": F.lit(ey),
        "stride_x": F.lit(sx), "stride_y": F.lit(sy),
        "valid_width": F.least(F.lit(ex).cast("long"), W - F.col("tile_x")).cast("int"),
        "valid_height": F.least(F.lit(ey).cast("long"), H - F.col("tile_y")).cast("int"),
    })
    return out.drop("_x0", "_y0", "_lx", "_ly", "_nx", "_ny")


def grid_size(extent_x: int, extent_y: int, downsample: float, tile_extent: tuple[int, int],
              stride: tuple[int, int], last: str, roi: tuple[int, int, int, int] | None = None) -> int:
    """Number of tiles :func:`expand_grid` makes for one slide (computed without Spark)."""
    x0, y0, x1, y1 = 0, 0, extent_x, extent_y
    if roi is not None:
        rx, ry, rw, rh = roi
        x0, y0 = min(math.floor(rx / downsample), extent_x), min(math.floor(ry / downsample), extent_y)
        x1, y1 = min(math.ceil((rx + rw) / downsample), extent_x), min(math.ceil((ry + rh) / downsample), extent_y)
    return axis_count(x1 - x0, tile_extent[0], stride[0], last) * axis_count(y1 - y0, tile_extent[1], stride[1], last)
