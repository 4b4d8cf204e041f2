"""Overlay files: label images over a slide's level-0 extent, saved as pyramidal TIFFs.

Convention (masks slidelake computes and overlays users bring, e.g. a segmentation model's
output):

* a single-channel uint8 label image; 0 = background, 255 = tissue; other values are further
  labels (``overlay_fractions`` reports every value present);
* it covers the slide's level-0 extent: overlay pixel ``(i, j)`` covers level-0 px
  ``[j * ds_x, (j + 1) * ds_x) x [i * ds_y, (i + 1) * ds_y)`` with ``ds_x = width0 / mask_width``
  and ``ds_y = height0 / mask_height``; the overlay's mpp is ``slide_mpp * ds``;
* TIFF resolution tags hold that mpp (pixels per centimetre = 1e4 / mpp), so OpenSlide reports
  it as ``openslide.mpp-x`` and tifffile as ``XResolution``.

Computed overlays live at ``<overlay root>/overlays/<slide_id>/tissue-<params_hash>.tiff``; a
user overlay is a manifest column or a sidecar file beside the slide.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from slidelake.config import MaskConfig, StorageConfig
from slidelake.storage import exists, is_remote, join, read_bytes, write_bytes


class MaskError(ValueError):
    """A slide cannot get a mask (mask too large, unreadable overlay, ...)."""


def write_overlay(path: str, labels: np.ndarray, mpp: tuple[float, float], tile: int = 256,
                  storage: StorageConfig | None = None) -> None:
    """Save a label image as a tiled, pyramidal, deflate-compressed (Big)TIFF overlay.

    Level ``k`` is level 0 subsampled by ``2**k`` (nearest: labels are never blended), written
    as successive IFDs (``NewSubfileType`` reduced image), which is how OpenSlide's generic
    TIFF reader finds levels; levels stop when the longer side is at most ``tile`` px.

    Args:
        path: output file or ``s3://`` object (written whole, atomically for readers,
            :func:`slidelake.storage.write_bytes`).
        labels: uint8 ``(h, w)``.
        mpp: ``(x, y)`` µm/px of level 0, stored as resolution tags in pixels per centimetre.
        storage: how an ``s3://`` path is reached.
    """
    import tifffile

    buf = io.BytesIO()
    bigtiff = labels.nbytes > 2**31
    with tifffile.TiffWriter(buf, bigtiff=bigtiff) as tw:
        k, lvl = 0, labels
        while True:
            kw: dict[str, Any] = dict(
                tile=(tile, tile), photometric="minisblack", compression="zlib",
                subfiletype=0 if k == 0 else 1, metadata=None,
                resolution=(1e4 / (mpp[0] * 2**k), 1e4 / (mpp[1] * 2**k)), resolutionunit="CENTIMETER",
            )
            tw.write(np.ascontiguousarray(lvl), **kw)
            if max(lvl.shape) <= tile:
                break
            k, lvl = k + 1, labels[:: 2 ** (k + 1), :: 2 ** (k + 1)]
    write_bytes(path, buf.getbuffer(), storage)


def read_overlay(path: str, storage: StorageConfig | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read level 0 of an overlay TIFF (a file, or an ``s3://`` object read whole with
    ``storage``).

    Returns:
        ``(labels, mpp)``: uint8 ``(h, w)`` (the first channel of a multi-channel image) and
        ``(mpp_x, mpp_y)`` from the resolution tags, or None when the file has none.

    Raises:
        MaskError: not a readable TIFF or not an integer image.
    """
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(read_bytes(path, storage)) if is_remote(path) else path) as tf:
            page = tf.pages[0]
            arr = page.asarray()
            mpp = None
            unit = page.tags.get("ResolutionUnit")
            xr, yr = page.tags.get("XResolution"), page.tags.get("YResolution")
            if xr is not None and yr is not None and unit is not None and int(unit.value) in (2, 3):
                per_um = 1e4 if int(unit.value) == 3 else 25400.0  # 3 = cm, 2 = inch
                fx = xr.value[0] / xr.value[1] if xr.value[1] else 0
                fy = yr.value[0] / yr.value[1] if yr.value[1] else 0
                if fx > 0 and fy > 0 and not (fx == 1 and fy == 1):
                    mpp = (per_um / fx, per_um / fy)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad overlay
        raise MaskError(f"cannot read overlay {path}: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] <= 4 else arr[0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise MaskError(f"overlay {path} must be a single-channel integer label image, got {arr.dtype}{arr.shape}")
    if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
        raise MaskError(f"overlay {path}: label values must be 0-255")
    return arr.astype(np.uint8, copy=False), mpp


def overlay_dir(lake_root: str, slide_id: str) -> str:
    """Folder of a slide's overlay files: ``<lake>/overlays/<slide_id>`` (a URI under an
    ``s3://`` root)."""
    return join(lake_root, "overlays", slide_id)


def user_overlay_path(path: str, attributes: dict[str, str] | None, cfg: MaskConfig,
                      storage: StorageConfig | None = None) -> str | None:
    """The user overlay of a slide: the manifest column ``cfg.overlay_column``, else a sidecar
    ``<slide path without extension><cfg.overlay_suffix>`` (or the ``.tif`` spelling) that
    exists (an object beside an ``s3://`` slide, reached with ``storage``); None when neither.
    A relative manifest value is relative to the slide's folder."""
    attrs = attributes or {}
    given = attrs.get(cfg.overlay_column)
    if given:
        return given if os.path.isabs(given) or "://" in given else join(path.rsplit("/", 1)[0], given)
    stem, _ = os.path.splitext(path)
    suffixes = [cfg.overlay_suffix]
    if cfg.overlay_suffix.endswith(".tiff"):
        suffixes.append(cfg.overlay_suffix[:-1])
    for suf in suffixes:
        if exists(stem + suf, storage):
            return stem + suf
    return None


def computed_overlay_path(lake_root: str, slide_id: str, phash: str) -> str:
    """The computed overlay of a slide: ``<lake>/overlays/<slide_id>/tissue-<params_hash>.tiff``."""
    return join(overlay_dir(lake_root, slide_id), f"tissue-{phash}.tiff")


__all__ = ["MaskError", "write_overlay", "read_overlay", "overlay_dir", "user_overlay_path", "computed_overlay_path"]
