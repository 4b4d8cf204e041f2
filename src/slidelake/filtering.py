"""Filter stage: keep decoded tiles that pass the configured pixel rule."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from slidelake.config import FilterConfig


def keep_rule(cfg: FilterConfig) -> Column:
    """Boolean column: the tile decoded and meets every bound of ``cfg``.

    ``tile_std >= min_std`` and ``background_fraction <= max_background_fraction``; a bound
    set to null is not applied. Tiles with a ``decode_error`` never pass.
    """
    rule = F.col("decode_error").isNull() & F.col("tile").isNotNull()
    if cfg.min_std is not None:
        rule = rule & (F.col("tile_std") >= F.lit(cfg.min_std))
    if cfg.max_background_fraction is not None:
        rule = rule & (F.col("background_fraction") <= F.lit(cfg.max_background_fraction))
    return rule


def filter_tiles(decoded: DataFrame, cfg: FilterConfig) -> DataFrame:
    """Rows of ``decoded`` (output of :func:`slidelake.decode.decode_tiles`) that pass
    :func:`keep_rule`."""
    return decoded.where(keep_rule(cfg))
