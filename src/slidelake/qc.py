"""QC pictures: a slide's thumbnail with its mask outline and the tiles a run kept.

Each mask has one picture, ``<overlay root>/overlays/<slide_id>/qc-<params_hash>.png``: the
thumbnail at the mask resolution (a fluorescence slide's contrast-stretched, :func:`stretch`),
the mask outline in green and each kept tile's rectangle outlined in yellow, upscaled by an
integer factor towards :data:`QC_MAX_SIDE` px.
"""

from __future__ import annotations

import io

import numpy as np

from slidelake.config import StorageConfig
from slidelake.rows import MaskRow
from slidelake.storage import read_bytes, write_bytes

QC_MAX_SIDE = 1024  # px of the longer side of a QC picture (small slides are upscaled to it)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool ``(h, w)``: tissue pixels with a background 4-neighbour (the mask's outline; outside
    the image counts as tissue). The same pixels as scikit-image's
    ``find_boundaries(mask > 0, mode="inner")``, by a binary erosion with the 4-connected cross
    (SciPy; ~3x faster: 6 against 18 ms for a 1,280 x 960 mask)."""
    from scipy import ndimage

    fg = mask > 0
    return fg & ~ndimage.binary_erosion(fg, structure=ndimage.generate_binary_structure(2, 1), border_value=1)


def stretch(rgb: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """A dark (fluorescence) thumbnail made legible: the ``low``-``high`` percentile range of
    its brightness (the brightest channel) mapped to 0-255, the same range for every channel so
    that a channel holding only noise stays dark (scikit-image ``exposure.rescale_intensity``);
    a flat image is left as it is. uint8 ``(h, w, 3)`` in and out."""
    from skimage import exposure

    lo, hi = np.percentile(rgb.max(axis=2), (low, high))
    if hi <= lo:
        return rgb.copy()
    return exposure.rescale_intensity(rgb, in_range=(lo, hi), out_range=(0, 255)).astype(np.uint8)


def qc_picture(rgb: np.ndarray, mask: np.ndarray, tiles: np.ndarray | None = None,
               max_side: int = QC_MAX_SIDE, inplace: bool = False, polarity: str | None = None) -> np.ndarray:
    """Draw the mask outline (green) and tile rectangles (yellow outlines) on a thumbnail.

    Args:
        rgb: uint8 ``(h, w, 3)`` thumbnail at the mask resolution.
        mask: ``(h, w)`` labels (non-zero = tissue).
        tiles: float ``(n, 4)`` rectangles ``x0, y0, x1, y1`` in mask px, or None.
        max_side: the picture is upscaled by an integer factor so its longer side approaches
            this (small slides stay legible); never downscaled.
        inplace: draw the outline on ``rgb`` itself instead of a copy (saves 3 bytes per mask
            pixel when the caller no longer needs the thumbnail).
        polarity: the mask's; ``fluorescence`` stretches the thumbnail's contrast first.

    Returns:
        uint8 ``(h * k, w * k, 3)`` (``rgb`` itself when ``inplace``, ``k == 1`` and no tiles).
    """
    from PIL import Image, ImageDraw

    h, w = mask.shape
    k = max(1, max_side // max(h, w))
    base = stretch(rgb) if polarity == "fluorescence" else rgb if inplace else rgb.copy()
    base[mask_outline(mask)] = (0, 200, 0)
    if k == 1 and (tiles is None or not len(tiles)):
        return base
    img = Image.fromarray(base).resize((w * k, h * k), Image.Resampling.NEAREST)
    if tiles is not None and len(tiles):
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1 in np.asarray(tiles, dtype=np.float64) * k:
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 200, 0))
    return np.asarray(img)


def encode_picture(rgb: np.ndarray, fmt: str, **options) -> bytes:
    """uint8 ``(h, w, 3)`` (or ``(h, w)``) pixels as the bytes of a ``fmt`` (Pillow format name,
    e.g. ``JPEG``, ``PNG``) file; ``options`` go to Pillow's ``save``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **options)
    return buf.getvalue()


def draw_qc(masks: dict[str, MaskRow], rects: dict[str, np.ndarray], storage: StorageConfig | None = None) -> None:
    """Draw each slide's QC picture (``masks.qc_path``) with the tiles a run kept.

    ``rects``: ``{slide_id: (n, 4) array}`` of the kept tiles' ``(x0, y0, x1, y1)`` in
    level-0 px, as the workers' task results report them (a slide absent: the outline only).
    Drawn in mask px over the thumbnail, on the driver, one thread per core (a picture takes
    tens of ms); ``storage`` reaches overlays and pictures in an ``s3://`` lake.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from slidelake.overlays import read_overlay

    todo = {sid: m for sid, m in masks.items() if m.get("qc_path") and m.get("thumbnail_path")}
    if not todo:
        return

    def draw(sid: str) -> None:
        m = todo[sid]
        boxes = np.asarray(rects.get(sid, np.zeros((0, 4))), dtype=float)
        boxes = boxes / np.array([m["mask_downsample_x"], m["mask_downsample_y"]] * 2, dtype=float)
        labels, _ = read_overlay(m["mask_path"], storage)
        rgb = np.asarray(Image.open(io.BytesIO(read_bytes(m["thumbnail_path"], storage))).convert("RGB"))
        picture = qc_picture(rgb, labels, boxes, polarity=m.get("polarity"))
        write_bytes(m["qc_path"], encode_picture(picture, "PNG", compress_level=1), storage)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(draw, list(todo)))


def draw_qc_after_failure(masks: dict[str, MaskRow], storage: StorageConfig | None = None) -> None:
    """The QC pictures of ``masks`` (made by a tiling run that then failed), outline only; an
    error here is logged, not raised over the run's own error."""
    try:
        draw_qc(masks, {}, storage)
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        import logging

        logging.getLogger(__name__).warning("QC pictures of the failed run not drawn: %s", exc)


__all__ = ["QC_MAX_SIDE", "mask_outline", "stretch", "qc_picture", "encode_picture", "draw_qc", "draw_qc_after_failure"]
