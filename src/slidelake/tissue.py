"""The tissue algorithm: RGB at the mask resolution in, a label mask out (NumPy, SciPy,
scikit-image; no Spark, no files).

Brightfield follows CLAM (HSV saturation + Otsu, closing) and, as an option, ratiopath's
``tissue_mask`` (grey levels, multi-Otsu, closing then opening); fluorescence slides (bright
tissue on black, detected by :func:`detect_polarity`) are thresholded on the log of their
brightest channel. Morphology sizes are in µm, turned into mask px with the mask's mpp.
"""

from __future__ import annotations

from typing import Any

import math

import numpy as np

from slidelake.config import MaskConfig

TISSUE = 255
BACKGROUND = 0


def mask_size(width0: int, height0: int, mpp_x: float, mpp_y: float, mask_mpp: float) -> tuple[int, int]:
    """``(mask_width, mask_height)`` in mask px for a slide of ``width0 x height0`` level-0 px
    at ``mpp_x, mpp_y`` µm/px: ``round(width0 * mpp_x / mask_mpp)``, at least 1.

    The overlay then covers the level-0 extent exactly, with downsample ``width0 / mask_width``
    (within half a mask pixel of ``mask_mpp / mpp``).
    """
    return (max(1, round(width0 * mpp_x / mask_mpp)), max(1, round(height0 * mpp_y / mask_mpp)))


def detect_polarity(rgb: np.ndarray, valid: np.ndarray) -> str:
    """``fluorescence`` when the median grey level of the image border (outer 5 %, slide pixels
    only) is below 80 (dark background), else ``brightfield``.

    Args:
        rgb: uint8 ``(h, w, 3)``; valid: bool ``(h, w)``.
    """
    h, w = valid.shape
    by, bx = max(1, h // 20), max(1, w // 20)
    border = np.ones((h, w), bool)
    border[by:h - by, bx:w - bx] = False
    sel = border & valid
    if not sel.any():
        sel = valid
    if not sel.any():
        return "brightfield"
    grey = rgb[sel].mean(axis=1)  # border pixels only: no float64 (h, w) grey image
    return "fluorescence" if float(np.median(grey)) < 80 else "brightfield"


STRIP_ROWS = 256  # mask rows processed at once where a whole-mask temporary would cost memory


def _feature(rgb: np.ndarray, method: str, polarity: str) -> np.ndarray:
    """float32 ``(h, w)`` feature image, larger = more tissue-like.

    * brightfield ``saturation``: HSV saturation ``(max - min) / max`` of R, G, B, 0 where
      ``max == 0``, as ``skimage.color.rgb2hsv`` defines it (0-1);
    * brightfield ``grayscale``: darkness ``255 - (R + G + B) / 3`` (0-255);
    * fluorescence: the brightest channel ``max(R, G, B)`` (0-255; :func:`tissue_mask` takes its
      log after smoothing).

    Computed in strips of :data:`STRIP_ROWS` rows from the channel planes, so the only
    full-size allocation is the float32 result (4 bytes per mask pixel); ``rgb2hsv`` would make
    float64 ``(h, w, 3)`` copies (~10x the mask's size). float32 holds these values to a relative
    1e-7, far below the thresholds' resolution (Otsu on 256 histogram bins).
    """
    h, w = rgb.shape[:2]
    out = np.empty((h, w), np.float32)
    for y in range(0, h, STRIP_ROWS):
        part = rgb[y:y + STRIP_ROWS]
        r, g, b = part[..., 0], part[..., 1], part[..., 2]
        o = out[y:y + STRIP_ROWS]
        if polarity == "fluorescence" or method == "saturation":
            mx = np.maximum(np.maximum(r, g), b)
        if polarity == "fluorescence":
            o[...] = mx  # log after smoothing
        elif method == "saturation":
            np.subtract(mx, np.minimum(np.minimum(r, g), b), out=o, dtype=np.float32)
            np.divide(o, mx, out=o, where=mx > 0)
        else:
            np.add(r, g, out=o, dtype=np.float32)
            o += b
            np.subtract(765.0, o, out=o)
            o /= 3.0
    return out


def remove_small_components(fg: np.ndarray, max_px: int) -> np.ndarray:
    """Clear, in place, the 4-connected components of ``fg`` of at most ``max_px`` pixels.

    The result equals ``skimage.morphology.remove_small_objects(fg, max_size=max_px)`` (its
    default ``connectivity=1``), and ``remove_small_holes`` on the inverted image; skimage indexes
    its int32 labels with an int64 copy and copies the input (13 bytes per pixel in all), this
    walks the labels in strips of :data:`STRIP_ROWS` rows (4 bytes per pixel: the
    labels).

    Args:
        fg: bool ``(h, w)``, modified in place.
        max_px: size in pixels up to which a component is removed.

    Returns:
        ``fg``.
    """
    from scipy import ndimage

    if max_px <= 0:
        return fg
    labels, n = ndimage.label(fg)  # int32, 4-connectivity (the default structure)
    if n == 0:
        return fg
    sizes = np.zeros(n + 1, np.int64)
    for y in range(0, fg.shape[0], STRIP_ROWS):
        sizes += np.bincount(labels[y:y + STRIP_ROWS].ravel(), minlength=n + 1)
    small = sizes <= max_px
    small[0] = False  # the background
    for y in range(0, fg.shape[0], STRIP_ROWS):
        fg[y:y + STRIP_ROWS] &= ~small[labels[y:y + STRIP_ROWS]]
    return fg


def _valid_histogram(feat: np.ndarray, valid: np.ndarray, nbins: int = 256
                     ) -> tuple[np.ndarray, np.ndarray] | np.floating | None:
    """Histogram of ``feat`` over the slide pixels (``valid``), strip by strip.

    Returns:
        ``(counts, bin_centers)`` (int64 and float ``(nbins,)``) equal to what
        ``skimage.exposure.histogram(feat[valid], nbins, source_range='image')`` gives for a float
        image (``nbins`` equal bins from the minimum to the maximum), which is what
        ``threshold_otsu`` / ``threshold_multiotsu`` compute from an image; without the copies
        of the values they make (8 bytes per mask pixel). The single value when all slide
        pixels are equal; None when there are none.
    """
    lo = hi = None
    for y in range(0, feat.shape[0], STRIP_ROWS):
        v = feat[y:y + STRIP_ROWS][valid[y:y + STRIP_ROWS]]
        if v.size:
            lo = v.min() if lo is None else min(lo, v.min())
            hi = v.max() if hi is None else max(hi, v.max())
    if lo is None or lo == hi:
        return lo
    counts = np.zeros(nbins, np.int64)
    edges = None
    for y in range(0, feat.shape[0], STRIP_ROWS):
        c, edges = np.histogram(feat[y:y + STRIP_ROWS][valid[y:y + STRIP_ROWS]], bins=nbins,
                                range=(lo, hi))
        counts += c
    return counts, (edges[:-1] + edges[1:]) / 2.0


def tissue_mask(rgb: np.ndarray, valid: np.ndarray, mask_mpp: tuple[float, float] | float,
                cfg: MaskConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Threshold and clean a tissue mask.

    Steps: feature image (HSV saturation or darkness for brightfield, the brightest channel for
    fluorescence) -> Gaussian smoothing (sigma ``smooth_um``) -> log (fluorescence) -> threshold (Otsu,
    3-class multi-Otsu taking the lowest threshold, or a fixed value; computed on slide pixels
    only) -> closing (disk ``close_um``) -> opening (disk ``open_um``) -> removal of objects and
    holes of at most ``min_object_um2`` / ``min_hole_um2``. Pixels outside the slide are
    background.

    Memory: beyond its inputs (4 bytes per mask pixel) it allocates under 12 bytes per mask
    pixel (a float32 feature smoothed in place, bool masks, int32 component labels; histograms
    and lookups go strip by strip), so a 100,000 x 80,000 px slide's 3,125 x 2,500 px mask
    needs ~100 MiB; ``masks.max_megapixels`` caps the mask's size.

    Args:
        rgb: uint8 ``(h, w, 3)`` at the mask resolution; valid: bool ``(h, w)``.
        mask_mpp: µm/px of ``rgb`` (``(x, y)`` or one value), to convert µm to px.
        cfg: the mask settings.

    Returns:
        ``(mask, info)``: uint8 ``(h, w)`` with 0 / 255, and ``{"polarity", "thresholds",
        "algorithm"}``.
    """
    from skimage import filters, morphology

    mx, my = (mask_mpp, mask_mpp) if isinstance(mask_mpp, (int, float)) else mask_mpp
    um = math.sqrt(mx * my)  # µm per px (geometric mean for slightly anisotropic masks)
    polarity = detect_polarity(rgb, valid) if cfg.polarity == "auto" else cfg.polarity
    feat = _feature(rgb, cfg.method, polarity)  # float32, the only full-size float image
    if cfg.smooth_um > 0:
        filters.gaussian(feat, sigma=cfg.smooth_um / um, preserve_range=True, out=feat)  # separable: in place is exact
    if polarity == "fluorescence":
        # smoothing first spreads sparse nuclear signal (DAPI) over the tissue between nuclei
        np.log1p(feat, out=feat)
    hist = _valid_histogram(feat, valid)
    thresholds: list[float]
    if not isinstance(hist, tuple):  # no slide pixels, or a flat image: no tissue
        thresholds = [0.0 if hist is None else float(hist)]
        fg = np.zeros(feat.shape, bool)
    else:
        counts, centers = hist
        if cfg.threshold == "otsu":
            thresholds = [float(filters.threshold_otsu(hist=(counts, centers)))]
        elif cfg.threshold == "multi_otsu":
            try:
                thresholds = [float(t) for t in filters.threshold_multiotsu(hist=(counts / counts.sum(), centers),
                                                                            classes=3)]
            except ValueError:  # too few distinct values for 3 classes
                thresholds = [float(filters.threshold_otsu(hist=(counts, centers)))]
        else:
            thresholds = [float(cfg.threshold)]
        fg = feat > thresholds[0]
        fg &= valid
    del feat
    if cfg.close_um > 0:
        fg = morphology.closing(fg, morphology.disk(max(1, round(cfg.close_um / um))))
    if cfg.open_um > 0:
        fg = morphology.opening(fg, morphology.disk(max(1, round(cfg.open_um / um))))
    if cfg.min_object_um2 > 0:
        remove_small_components(fg, int(cfg.min_object_um2 / (mx * my)))
    if cfg.min_hole_um2 > 0:
        np.logical_not(fg, out=fg)  # holes are the background's small components
        remove_small_components(fg, int(cfg.min_hole_um2 / (mx * my)))
        np.logical_not(fg, out=fg)
    fg &= valid
    feature = "log_max_channel" if polarity == "fluorescence" else cfg.method
    algorithm = f"{polarity}:{feature}:{cfg.threshold if isinstance(cfg.threshold, str) else 'fixed'}"
    mask = fg.view(np.uint8) * np.uint8(TISSUE)  # bool is one byte of 0 / 1: 0 / 255
    return mask, {"polarity": polarity, "thresholds": thresholds, "algorithm": algorithm}


__all__ = ["TISSUE", "BACKGROUND", "mask_size", "detect_polarity", "remove_small_components", "tissue_mask"]
