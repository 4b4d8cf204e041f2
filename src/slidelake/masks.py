"""Tissue masks: one label overlay per slide, computed once, saved as a pyramidal TIFF, reused.

Stage ``masks``: for every readable slide, read the slide at the mask resolution
(``masks.mpp``, default 8 µm/px) from the nearest pyramid level that is not coarser than needed,
in bounded ``chunk_px`` regions, threshold it, clean it morphologically and save it as an
overlay file ``<lake>/overlays/<slide_id>/tissue-<params_hash>.tiff``; write one row per slide
to the ``masks`` table (:data:`MASKS_SCHEMA`).

Overlay convention (also for overlays users bring, e.g. a segmentation model's output):

* a single-channel uint8 label image; 0 = background, 255 = tissue; other values are further
  labels (``overlay_fractions`` reports every value present);
* it covers the slide's level-0 extent: overlay pixel ``(i, j)`` covers level-0 px
  ``[j * ds_x, (j + 1) * ds_x) x [i * ds_y, (i + 1) * ds_y)`` with ``ds_x = width0 / mask_width``
  and ``ds_y = height0 / mask_height``; the overlay's mpp is ``slide_mpp * ds``;
* TIFF resolution tags hold that mpp (pixels per centimetre = 1e4 / mpp), so OpenSlide reports
  it as ``openslide.mpp-x`` and tifffile as ``XResolution``.

The thresholding follows CLAM (HSV saturation + Otsu, closing) for brightfield and ratiopath's
``tissue_mask`` (grey levels, multi-Otsu, closing then opening) as an option; fluorescence
slides (bright tissue on black) are thresholded on the log of their brightest channel.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from slidelake.config import MaskConfig
from slidelake.memory import freeze_long_lived, peak_rss_mib, release_memory, reset_peak_rss
from slidelake.slides import SLIDES_SCHEMA
from slidelake.spark import local_frame

TISSUE = 255
BACKGROUND = 0
NOMINAL_MPP = 0.25  # µm/px assumed for the mask of a slide without mpp (40x; recorded in `algorithm`)
QC_MAX_SIDE = 1024  # px of the longer side of a QC picture (small slides are upscaled to it)

MASKS_SCHEMA = T.StructType([
    T.StructField("slide_id", T.StringType(), False),
    T.StructField("path", T.StringType(), True),
    T.StructField("fingerprint", T.StringType(), True),
    T.StructField("source", T.StringType(), True),  # computed | user
    T.StructField("mask_path", T.StringType(), True),
    T.StructField("mask_mpp_x", T.DoubleType(), True),
    T.StructField("mask_mpp_y", T.DoubleType(), True),
    T.StructField("mask_downsample_x", T.DoubleType(), True),  # level-0 px per mask px
    T.StructField("mask_downsample_y", T.DoubleType(), True),
    T.StructField("mask_width", T.LongType(), True),
    T.StructField("mask_height", T.LongType(), True),
    T.StructField("slide_width", T.LongType(), True),
    T.StructField("slide_height", T.LongType(), True),
    T.StructField("read_level", T.IntegerType(), True),
    T.StructField("algorithm", T.StringType(), True),
    T.StructField("params", T.StringType(), True),  # JSON of the algorithm settings
    T.StructField("params_hash", T.StringType(), False),
    T.StructField("polarity", T.StringType(), True),
    T.StructField("thresholds", T.ArrayType(T.DoubleType()), True),
    T.StructField("tissue_fraction", T.DoubleType(), True),
    T.StructField("qc_path", T.StringType(), True),
    T.StructField("thumbnail_path", T.StringType(), True),
    T.StructField("status", T.StringType(), False),
    T.StructField("error", T.StringType(), True),
    T.StructField("run_id", T.StringType(), True),
    T.StructField("created_at", T.TimestampType(), True),
])


class MaskError(ValueError):
    """A slide cannot get a mask (no mpp, unreadable overlay, ...)."""


# ----------------------------------------------------------------------------- pure helpers

def params_hash(cfg: MaskConfig) -> str:
    """SHA-256 (16 hex digits) of the mask algorithm settings (:meth:`MaskConfig.algorithm_dict`)."""
    blob = json.dumps(cfg.algorithm_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mask_size(width0: int, height0: int, mpp_x: float, mpp_y: float, mask_mpp: float) -> tuple[int, int]:
    """``(mask_width, mask_height)`` in mask px for a slide of ``width0 x height0`` level-0 px
    at ``mpp_x, mpp_y`` µm/px: ``round(width0 * mpp_x / mask_mpp)``, at least 1.

    The overlay then covers the level-0 extent exactly, with downsample ``width0 / mask_width``
    (within half a mask pixel of ``mask_mpp / mpp``).
    """
    return (max(1, round(width0 * mpp_x / mask_mpp)), max(1, round(height0 * mpp_y / mask_mpp)))


def read_slide_at(slide: Any, out_size: tuple[int, int], chunk_px: int = 2048,
                  threads: int = 1, native: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole slide resized to ``out_size`` = ``(w, h)`` px, in bounded-memory regions.

    The read level is OpenSlide's ``get_best_level_for_downsample`` of the needed downsample
    (the coarsest level not coarser than needed); it is read in regions of at most
    ``chunk_px`` x ``chunk_px`` px of that level, each resized (box filter = area average) to
    the output pixels it covers, so memory is bounded by ``chunk_px`` whatever the slide's size
    (a single-level slide is never decoded whole).

    Args:
        slide: an ``openslide.OpenSlide`` (or an object with its API).
        out_size: output ``(width, height)`` px; output pixel ``(i, j)`` covers level-0 px
            ``[j * W0 / w, (j + 1) * W0 / w) x [i * H0 / h, (i + 1) * H0 / h)``.
        chunk_px: side of a region read at once, in px of the read level.
        threads: regions read at once (OpenSlide and Pillow release the GIL; each region fills
            its own output pixels, so the result does not depend on it); memory grows by one
            region per thread. 2 threads read the 100,000 x 80,000 px benchmark slide's
            6,250 x 5,000 px level in 0.34 s instead of 0.69 s (``docs/benchmarks.md``).
        native: a :class:`slidelake.native.NativeSlide` of the same file, or None. When the read
            level is stored as JPEG tiles it is read from them (the region's top-left level px
            is ``floor(x0 / level_downsample)``; no cache, so threads share it safely) instead
            of ``read_region``; a region with a corrupt stored tile is read by OpenSlide.

    Returns:
        ``(rgb, valid)``: uint8 ``(h, w, 3)`` colours (not premultiplied) and bool ``(h, w)``,
        true where the slide has pixels (OpenSlide alpha >= 128; inside the level for a
        native read).
    """
    from PIL import Image

    from slidelake.native import CorruptTileError

    w, h = out_size
    W0, H0 = slide.dimensions
    ds_x, ds_y = W0 / w, H0 / h
    level = slide.get_best_level_for_downsample(min(ds_x, ds_y))
    lds = slide.level_downsamples[level]
    stored = native.level(level) if native is not None else None
    step_x = max(1, int(chunk_px * lds // ds_x))  # output px per region
    step_y = max(1, int(chunk_px * lds // ds_y))
    rgb = np.empty((h, w, 3), np.uint8)  # filled region by region: no (h, w, 4) copy of the slide
    valid = np.empty((h, w), bool)

    def from_stored(x0: int, y0: int, rw: int, rh: int, ow: int, oh: int) -> tuple[np.ndarray, np.ndarray] | None:
        lx, ly = int(x0 // lds), int(y0 // lds)
        try:
            px = stored.read(lx, ly, rw, rh, cache=False)
        except CorruptTileError:
            return None  # OpenSlide decides
        inside_w, inside_h = min(rw, stored.width - lx), min(rh, stored.height - ly)
        out = np.asarray(Image.fromarray(px).resize((ow, oh), Image.Resampling.BOX))
        if inside_w >= rw and inside_h >= rh:
            return out, np.ones((oh, ow), bool)
        inside = np.zeros((rh, rw), np.uint8)
        inside[:max(0, inside_h), :max(0, inside_w)] = 255
        return out, np.asarray(Image.fromarray(inside).resize((ow, oh), Image.Resampling.BOX)) >= 128

    def read(ox: int, oy: int) -> None:
        ow, oh = min(step_x, w - ox), min(step_y, h - oy)
        x0, y0 = math.floor(ox * ds_x), math.floor(oy * ds_y)
        x1, y1 = math.ceil((ox + ow) * ds_x), math.ceil((oy + oh) * ds_y)
        rw = max(1, round((x1 - x0) / lds))
        rh = max(1, round((y1 - y0) / lds))
        got = from_stored(x0, y0, rw, rh, ow, oh) if stored is not None else None
        if got is not None:
            rgb[oy:oy + oh, ox:ox + ow], valid[oy:oy + oh, ox:ox + ow] = got
            return
        region = np.asarray(slide.read_region((x0, y0), level, (rw, rh)).resize((ow, oh), Image.Resampling.BOX))
        rgb[oy:oy + oh, ox:ox + ow] = region[..., :3]
        np.greater_equal(region[..., 3], 128, out=valid[oy:oy + oh, ox:ox + ow])

    origins = [(ox, oy) for oy in range(0, h, step_y) for ox in range(0, w, step_x)]
    if threads > 1 and len(origins) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(origins))) as pool:
            list(pool.map(lambda o: read(*o), origins))
    else:
        for o in origins:
            read(*o)
    return rgb, valid


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


def write_overlay(path: str, labels: np.ndarray, mpp: tuple[float, float], tile: int = 256) -> None:
    """Save a label image as a tiled, pyramidal, deflate-compressed (Big)TIFF overlay.

    Level ``k`` is level 0 subsampled by ``2**k`` (nearest: labels are never blended), written
    as successive IFDs (``NewSubfileType`` reduced image), which is how OpenSlide's generic
    TIFF reader finds levels; levels stop when the longer side is at most ``tile`` px.

    Args:
        path: output file (parent folders are created; written to ``path + '.tmp'`` then
            renamed, so readers never see a half-written overlay).
        labels: uint8 ``(h, w)``.
        mpp: ``(x, y)`` µm/px of level 0, stored as resolution tags in pixels per centimetre.
    """
    import tifffile

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    bigtiff = labels.nbytes > 2**31
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
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
    os.replace(tmp, path)


def read_overlay(path: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read level 0 of an overlay TIFF.

    Returns:
        ``(labels, mpp)``: uint8 ``(h, w)`` (the first channel of a multi-channel image) and
        ``(mpp_x, mpp_y)`` from the resolution tags, or None when the file has none.

    Raises:
        MaskError: not a readable TIFF or not an integer image.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
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


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool ``(h, w)``: tissue pixels with a background 4-neighbour (the mask's outline; outside
    the image counts as tissue). The same pixels as scikit-image's
    ``find_boundaries(mask > 0, mode="inner")``, by a binary erosion with the 4-connected cross
    (SciPy; ~3x faster: 6 against 18 ms for a 1,280 x 960 mask)."""
    from scipy import ndimage

    fg = mask > 0
    return fg & ~ndimage.binary_erosion(fg, structure=ndimage.generate_binary_structure(2, 1), border_value=1)


def qc_picture(rgb: np.ndarray, mask: np.ndarray, tiles: np.ndarray | None = None,
               max_side: int = QC_MAX_SIDE, inplace: bool = False) -> np.ndarray:
    """Draw the mask outline (green) and tile rectangles (yellow) on a thumbnail.

    Args:
        rgb: uint8 ``(h, w, 3)`` thumbnail at the mask resolution.
        mask: ``(h, w)`` labels (non-zero = tissue).
        tiles: float ``(n, 4)`` rectangles ``x0, y0, x1, y1`` in mask px, or None.
        max_side: the picture is upscaled by an integer factor so its longer side approaches
            this (small slides stay legible); never downscaled.
        inplace: draw the outline on ``rgb`` itself instead of a copy (saves 3 bytes per mask
            pixel when the caller no longer needs the thumbnail).

    Returns:
        uint8 ``(h * k, w * k, 3)`` (``rgb`` itself when ``inplace``, ``k == 1`` and no tiles).
    """
    from PIL import Image, ImageDraw

    h, w = mask.shape
    k = max(1, max_side // max(h, w))
    base = rgb if inplace else rgb.copy()
    base[mask_outline(mask)] = (0, 200, 0)
    if k == 1 and (tiles is None or not len(tiles)):
        return base
    img = Image.fromarray(base).resize((w * k, h * k), Image.Resampling.NEAREST)
    if tiles is not None and len(tiles):
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1 in np.asarray(tiles, dtype=np.float64) * k:
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 200, 0))
    return np.asarray(img)


# ------------------------------------------------------------------------------ the stage

def overlay_dir(lake_root: str, slide_id: str) -> str:
    """Folder of a slide's overlay files: ``<lake>/overlays/<slide_id>``."""
    return os.path.join(lake_root, "overlays", slide_id)


def user_overlay_path(path: str, attributes: dict[str, str] | None, cfg: MaskConfig) -> str | None:
    """The user overlay of a slide: the manifest column ``cfg.overlay_column``, else a sidecar
    ``<slide path without extension><cfg.overlay_suffix>`` (or the ``.tif`` spelling) that
    exists; None when neither. A relative manifest value is relative to the slide's folder."""
    attrs = attributes or {}
    given = attrs.get(cfg.overlay_column)
    if given:
        return given if os.path.isabs(given) else os.path.join(os.path.dirname(path), given)
    stem, _ = os.path.splitext(path)
    suffixes = [cfg.overlay_suffix]
    if cfg.overlay_suffix.endswith(".tiff"):
        suffixes.append(cfg.overlay_suffix[:-1])
    for suf in suffixes:
        if os.path.isfile(stem + suf):
            return stem + suf
    return None


def _computed_path(lake_root: str, slide_id: str, phash: str) -> str:
    return os.path.join(overlay_dir(lake_root, slide_id), f"tissue-{phash}.tiff")


def compute_mask(row: dict[str, Any], cfg: MaskConfig, lake_root: str, run_id: str,
                 phash: str, threads: int = 1, qc: bool = True) -> dict[str, Any]:
    """Make (or take the user's) overlay of one slide and return its ``masks`` row.

    A slide without mpp gets a mask made as if level 0 were :data:`NOMINAL_MPP` µm/px (said in
    ``algorithm``; ``mask_mpp_x/y`` stay null). Never raises: failures (unreadable slide or
    overlay) give ``status='error'`` and the message in ``error``.

    Args:
        row: a ``slides`` row (``slide_id``, ``path``, ``fingerprint``, ``width``, ``height``,
            ``mpp_x``, ``mpp_y``, ``attributes``).
        cfg, lake_root, run_id, phash: settings, lake root, run id, :func:`params_hash`.
        threads: threads reading the slide (:func:`read_slide_at`).
        qc: draw the QC picture (``qc_path``: thumbnail and mask outline) now; false when the
            caller draws it later (a tiling run, with its tiles). The path is in the row either way.
    """
    from datetime import datetime, timezone

    out: dict[str, Any] = {f.name: None for f in MASKS_SCHEMA.fields}
    out.update(slide_id=row["slide_id"], path=row["path"], fingerprint=row["fingerprint"],
               params_hash=phash, run_id=run_id, status="error",
               slide_width=int(row["width"]) if row["width"] is not None else None,
               slide_height=int(row["height"]) if row["height"] is not None else None,
               created_at=datetime.now(timezone.utc).replace(tzinfo=None))
    try:
        out.update(_compute_mask(row, cfg, lake_root, phash, threads, qc))
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - one slide's failure is its error row
        msg = f"{type(exc).__name__}: {exc}"
        # OpenSlide's own messages ("Unsupported or missing image file") do not say which file
        out["error"] = msg if str(row["path"]) in msg else f"{msg} ({row['path']})"
    return out


def _native_of(path: str, slide: Any) -> Any:
    """A :class:`slidelake.native.NativeSlide` of an open OpenSlide ``slide`` (None when its
    TIFF structure cannot be read: OpenSlide reads it then)."""
    from slidelake.native import open_native

    try:
        return open_native(path, 0, slide)
    except Exception:  # noqa: BLE001 - tifffile's own errors; OpenSlide opened the file and decides
        return None


def _read_at_mask_size(path: str, size: tuple[int, int], cfg: MaskConfig, threads: int
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """The slide at ``path`` read at ``size`` (w, h) (:func:`read_slide_at`, from the file's own
    tiles when ``cfg.reader`` allows), and the pyramid level it was read from."""
    import openslide

    slide = openslide.OpenSlide(path)
    native = _native_of(path, slide) if cfg.reader == "auto" else None
    try:
        rgb, valid = read_slide_at(slide, size, cfg.chunk_px, threads, native)
        w0, h0 = slide.dimensions
        return rgb, valid, int(slide.get_best_level_for_downsample(min(w0 / size[0], h0 / size[1])))
    finally:
        slide.close()
        if native is not None:
            native.close()


class MaskPixels(NamedTuple):
    """A computed mask before it is written: ``rgb`` uint8 ``(h, w, 3)`` (the slide read at the
    mask size), ``labels`` uint8 ``(h, w)``, ``info`` (:func:`tissue_mask`'s ``algorithm``,
    ``polarity``, ``thresholds``), ``mpp`` (µm per mask px, x and y), ``level`` (the pyramid
    level read)."""

    rgb: np.ndarray
    labels: np.ndarray
    info: dict[str, Any]
    mpp: tuple[float, float]
    level: int


def mask_pixels(path: str, width0: int, height0: int, mpp_x: float | None, mpp_y: float | None,
                cfg: MaskConfig, threads: int = 1) -> MaskPixels:
    """Read a slide at the mask size and threshold it (:func:`mask_size`, :func:`read_slide_at`,
    :func:`tissue_mask`); nothing is written. ``width0``, ``height0``: level-0 px; ``mpp_x``,
    ``mpp_y``: level-0 µm/px, None for a slide without mpp (the mask then assumes
    :data:`NOMINAL_MPP`, said in ``info["algorithm"]``).

    Raises:
        MaskError: the mask would exceed ``cfg.max_megapixels``.
        openslide.OpenSlideError, OSError: the slide cannot be read.
    """
    known = mpp_x is not None and mpp_y is not None
    # without mpp the mask geometry and µm settings assume NOMINAL_MPP at level 0
    mx, my = (mpp_x, mpp_y) if known else (NOMINAL_MPP, NOMINAL_MPP)
    w, h = mask_size(width0, height0, mx, my, cfg.mpp)
    if w * h > cfg.max_megapixels * 1e6:
        # absurd dimensions (a corrupt header, or masks.mpp far too fine) must not exhaust memory
        raise MaskError(f"the mask would be {w} x {h} px ({w * h / 1e6:,.0f} Mpx) at {cfg.mpp} µm/px, over "
                        f"masks.max_megapixels={cfg.max_megapixels:g}; raise masks.mpp or the limit")
    rgb, valid, level = _read_at_mask_size(path, (w, h), cfg, threads)
    mpp = (mx * width0 / w, my * height0 / h)
    labels, info = tissue_mask(rgb, valid, mpp, cfg)
    if not known:
        info["algorithm"] += f" (slide has no mpp: {NOMINAL_MPP} µm/px assumed for the mask)"
    return MaskPixels(rgb, labels, info, mpp, level)


def _compute_mask(row: dict[str, Any], cfg: MaskConfig, lake_root: str, phash: str, threads: int,
                  qc: bool) -> dict[str, Any]:
    from PIL import Image

    W0, H0 = int(row["width"]), int(row["height"])
    folder = overlay_dir(lake_root, row["slide_id"])
    user = user_overlay_path(row["path"], row.get("attributes"), cfg)
    if user is not None:
        labels, _ = read_overlay(user)
        h, w = labels.shape
        rgb, _valid, level = _read_at_mask_size(row["path"], (w, h), cfg, threads)
        res: dict[str, Any] = dict(source="user", mask_path=user, algorithm="user overlay",
                                   params=json.dumps({"overlay": user}))
    else:
        px = mask_pixels(row["path"], W0, H0, row["mpp_x"], row["mpp_y"], cfg, threads)
        rgb, labels, level = px.rgb, px.labels, px.level
        h, w = labels.shape
        mask_path = _computed_path(lake_root, row["slide_id"], phash)
        write_overlay(mask_path, labels, px.mpp)
        res = dict(source="computed", mask_path=mask_path, algorithm=px.info["algorithm"],
                   params=json.dumps(cfg.algorithm_dict(), sort_keys=True),
                   polarity=px.info["polarity"], thresholds=px.info["thresholds"])
    os.makedirs(folder, exist_ok=True)
    thumb = os.path.join(folder, f"thumbnail-{phash}.jpg")
    Image.fromarray(rgb).save(thumb, quality=90)
    qc_file = os.path.join(folder, f"qc-{phash}.png")
    if qc:
        # the outline is drawn on the thumbnail's pixels, no longer needed; zlib level 1 (~5x faster than 6, lossless)
        Image.fromarray(qc_picture(rgb, labels, inplace=True)).save(qc_file, compress_level=1)
    del rgb
    ds_x, ds_y = W0 / w, H0 / h
    mpp_x = row["mpp_x"] * ds_x if row["mpp_x"] is not None else None
    mpp_y = row["mpp_y"] * ds_y if row["mpp_y"] is not None else None
    res.update(
        mask_mpp_x=mpp_x, mask_mpp_y=mpp_y, mask_downsample_x=ds_x, mask_downsample_y=ds_y,
        mask_width=w, mask_height=h, read_level=int(level),
        tissue_fraction=float((labels != BACKGROUND).mean()), qc_path=qc_file, thumbnail_path=thumb,
    )
    return res


def _mask_row(rec: dict[str, Any], cfg: MaskConfig, lake_root: str, run_id: str, phash: str,
              on_profile: Callable[[dict[str, float]], None] | None, worker: bool,
              threads: int = 1, qc: bool = True) -> dict[str, Any]:
    """The ``masks`` row of one ``slides`` row (see :func:`make_masks`); ``worker``: in a Spark
    worker (measure its peak memory, give memory back afterwards); ``threads``: threads reading
    the slide; ``qc``: as :func:`compute_mask`."""
    if on_profile is not None and worker:
        reset_peak_rss()
    t0 = time.perf_counter()
    rec = dict(rec)
    attrs = rec.get("attributes")
    rec["attributes"] = dict(attrs) if attrs is not None else {}
    for k in ("mpp_x", "mpp_y", "width", "height"):
        if rec[k] is not None and isinstance(rec[k], float) and math.isnan(rec[k]):
            rec[k] = None  # pandas turns a null double into NaN
    row = compute_mask(rec, cfg, lake_root, run_id, phash, threads, qc)
    if on_profile is not None:
        fig = {"masks.s": time.perf_counter() - t0, "masks.slides": 1.0}
        if worker:
            fig["masks.worker_peak_mib"] = peak_rss_mib()
        on_profile(fig)
    if worker:
        release_memory()  # the worker is reused by the decode stage next
    return row


def compute_masks_on_driver(slides: list[dict[str, Any]], cfg: MaskConfig, lake_root: str, run_id: str,
                            on_profile: Callable[[dict[str, float]], None] | None = None,
                            qc: bool = True) -> list[dict[str, Any]]:
    """The masks of a few ``slides`` made in this process, one thread per core (up to one per
    slide; the cores left over read the slides' regions in parallel), without a Spark job: for
    fewer than ``masks.on_driver_below`` slides a job's start-up costs more than the masks (see
    :func:`make_masks` for the rows and ``on_profile``, which gets no worker peak here and is
    called under a lock; ``qc`` as :func:`compute_mask`). OpenSlide, NumPy and SciPy release the
    GIL in their loops.

    Returns:
        ``masks`` rows (dicts of :data:`MASKS_SCHEMA`), in the order of ``slides``.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    phash = params_hash(cfg)
    lock = threading.Lock()

    def report(fig: dict[str, float]) -> None:
        with lock:
            on_profile(fig)

    cores = os.cpu_count() or 1
    readers = max(1, cores // max(1, len(slides)))  # threads reading each slide

    def one(rec: dict[str, Any]) -> dict[str, Any]:
        return _mask_row(rec, cfg, lake_root, run_id, phash, report if on_profile is not None else None, False,
                         readers, qc)

    with ThreadPoolExecutor(max_workers=max(1, min(len(slides), cores))) as pool:
        return list(pool.map(one, slides))


def make_masks(spark: SparkSession, slides: list[dict[str, Any]], cfg: MaskConfig, lake_root: str,
               run_id: str, on_profile: Callable[[dict[str, float]], None] | None = None,
               qc: bool = True) -> DataFrame:
    """Compute the masks of ``slides`` (``slides`` rows as dicts), one Spark task per slide
    (``qc`` as :func:`compute_mask`).

    ``on_profile({"masks.s": seconds, "masks.slides": 1, "masks.worker_peak_mib": MiB})`` is
    called once per slide (``--profile``; the peak is the worker's resident set while it made
    this mask, :mod:`slidelake.memory`).

    Returns:
        A DataFrame of ``masks`` rows (:data:`MASKS_SCHEMA`), one per slide, in any order.
    """
    phash = params_hash(cfg)
    fields = ["slide_id", "path", "fingerprint", "width", "height", "mpp_x", "mpp_y", "attributes"]
    in_schema = T.StructType([f for f in SLIDES_SCHEMA.fields if f.name in fields])
    df = local_frame(spark, [{k: r[k] for k in fields} for r in slides], in_schema)
    cores = spark.sparkContext.defaultParallelism
    if len(slides) > cores:
        # more slides than cores: smaller tasks balance slides of different sizes
        df = df.repartition(min(len(slides), 4 * cores), "slide_id")
    else:
        # up to one slide per core, the local rows are already spread over the cores: no
        # shuffle stage (~2 s in a fresh session) and no task without a slide (each starts a
        # Python worker)
        df = df.coalesce(max(1, len(slides)))

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        freeze_long_lived()
        for pdf in batches:
            rows = [_mask_row(rec, cfg, lake_root, run_id, phash, on_profile, True, 1, qc) for rec in pdf.to_dict("records")]
            yield pd.DataFrame(rows, columns=MASKS_SCHEMA.fieldNames())

    spark.sparkContext.setJobDescription("masks")
    return df.mapInPandas(run, schema=MASKS_SCHEMA)


__all__ = [
    "MASKS_SCHEMA", "TISSUE", "BACKGROUND", "MaskError", "params_hash", "mask_size", "read_slide_at",
    "detect_polarity", "remove_small_components", "tissue_mask", "write_overlay", "read_overlay", "mask_outline", "qc_picture",
    "overlay_dir", "user_overlay_path", "MaskPixels", "mask_pixels", "compute_mask",
    "compute_masks_on_driver", "make_masks",
]
