"""Pixel filter stage: keep decoded tiles that pass the configured pixel rule.

Runs inside the Python workers, on the decode stage's pandas batches, right before the tiles are
written: a rejected tile's bytes never leave the worker.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slidelake.config import FilterConfig


def keep_mask(decoded: pd.DataFrame, cfg: FilterConfig) -> np.ndarray:
    """Boolean array, one per row of ``decoded`` (a batch from
    :func:`slidelake.decode.make_decoder`): the tile decoded and meets every bound of ``cfg``.

    ``tile_std >= min_std`` and ``background_fraction <= max_background_fraction``; a bound
    set to None is not applied. Tiles with a ``decode_error`` (or no ``tile`` bytes) never
    pass; NaN statistics never pass a bound.
    """
    keep = decoded["decode_error"].isna().to_numpy() & decoded["tile"].notna().to_numpy()
    if cfg.min_std is not None:
        keep &= decoded["tile_std"].to_numpy(dtype=float) >= cfg.min_std
    if cfg.max_background_fraction is not None:
        keep &= decoded["background_fraction"].to_numpy(dtype=float) <= cfg.max_background_fraction
    return keep
