"""The two filters of ``filter`` (:class:`~slidelake.config.FilterConfig`), both inside the
Python workers:

* before decode (:func:`overlap_keep`): on the overlap stage's Arrow batches (metadata only),
  so a rejected tile never goes back to the JVM, let alone gets decoded;
* after decode, the pixel filter (:func:`keep_mask`): on the decode stage's batches, right
  before the tiles are written, so a rejected tile's bytes never leave the worker.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slidelake.config import FilterConfig


def keep_mask(decoded: np.ndarray, tile_std: np.ndarray, background_fraction: np.ndarray,
              cfg: FilterConfig) -> np.ndarray:
    """The pixel filter: bool ``(n,)``, true where the tile decoded (``decoded``, bool ``(n,)``)
    and meets every bound of ``cfg``: ``tile_std >= min_std`` and ``background_fraction <=
    max_background_fraction`` (float64 ``(n,)``; grey-level std 0-255 and a fraction 0-1). A
    bound set to None is not applied; NaN statistics never pass a bound.
    """
    keep = np.asarray(decoded, bool).copy()
    if cfg.min_std is not None:
        keep &= np.asarray(tile_std, float) >= cfg.min_std
    if cfg.max_background_fraction is not None:
        keep &= np.asarray(background_fraction, float) <= cfg.max_background_fraction
    return keep


def overlap_keep(overlap: pa.RecordBatch, min_tissue_fraction: float | None,
                 min_annotated_fraction: float | None) -> pa.BooleanArray:
    """Which tile rows pass the filter before decode, one bool per row of ``overlap`` (the
    :data:`slidelake.overlap.OVERLAP_SCHEMA` columns of a batch).

    ``tissue_fraction >= min_tissue_fraction`` (a null fraction never passes) and
    ``annotated_fraction >= min_annotated_fraction`` (a tile of a slide without annotations
    counts as 0); a bound set to None is not applied. Rows with an ``overlap_error`` always
    pass: the write stage records them as failed tiles.
    """
    keep = pa.array(np.ones(overlap.num_rows, bool))
    if min_tissue_fraction is not None:
        keep = pc.and_kleene(keep, pc.greater_equal(overlap.column("tissue_fraction"), min_tissue_fraction))
    if min_annotated_fraction is not None:
        annotated = pc.fill_null(overlap.column("annotated_fraction"), 0.0)
        keep = pc.and_kleene(keep, pc.greater_equal(annotated, min_annotated_fraction))
    return pc.fill_null(pc.or_kleene(pc.is_valid(overlap.column("overlap_error")), keep), False)
