"""The masks stage: one tissue overlay per slide, computed once, saved as a pyramidal TIFF
(:mod:`slidelake.overlays`), reused while the slide and the mask settings are unchanged.

For every readable slide: read the slide at the mask resolution (``masks.mpp``, default
8 µm/px) from the nearest pyramid level that is not coarser than needed, in bounded
``chunk_px`` regions (:func:`read_slide_at`), threshold and clean it
(:func:`slidelake.tissue.tissue_mask`), save the overlay and a thumbnail, and write one row per
slide to the ``masks`` table (:data:`MASKS_SCHEMA`). A user overlay (manifest column or
sidecar) is taken instead of a computed one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from slidelake.config import MaskConfig, StorageConfig
from slidelake.memory import freeze_long_lived, peak_rss_mib, release_memory, reset_peak_rss
from slidelake.overlays import MaskError, computed_overlay_path, overlay_dir, read_overlay, user_overlay_path, write_overlay
from slidelake.qc import encode_picture, qc_picture
from slidelake.rows import MaskRow, SlideRow, spark_schema
from slidelake.slides import SLIDES_SCHEMA
from slidelake.slide_cache import cached_copy, local_copy
from slidelake.spark import local_frame
from slidelake.storage import RangedFile, exists, is_remote, join, write_bytes
from slidelake.tissue import BACKGROUND, mask_size, tissue_mask

if TYPE_CHECKING:
    from slidelake.config import PipelineConfig
    from slidelake.lake import Lake
    from slidelake.lineage import RunRecord

NOMINAL_MPP = 0.25  # µm/px assumed for the mask of a slide without mpp (40x; recorded in `algorithm`)

MASKS_SCHEMA = spark_schema(MaskRow)


def params_hash(cfg: MaskConfig) -> str:
    """SHA-256 (16 hex digits) of the mask algorithm settings (:meth:`MaskConfig.algorithm_dict`)."""
    blob = json.dumps(cfg.algorithm_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _region_from_stored(stored: Any, lds: float, x0: int, y0: int, rw: int, rh: int, ow: int, oh: int
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """A region of ``rw`` x ``rh`` px of a stored JPEG level (:class:`slidelake.native.NativeLevel`,
    downsample ``lds``) at level-0 ``(x0, y0)``, box-resized to ``ow`` x ``oh``: ``(rgb, valid)``,
    or None when a stored tile is corrupt (OpenSlide then reads the region)."""
    from PIL import Image

    from slidelake.native import CorruptTileError

    lx, ly = int(x0 // lds), int(y0 // lds)
    try:
        px = stored.read(lx, ly, rw, rh, cache=False)
    except CorruptTileError:
        return None
    inside_w, inside_h = min(rw, stored.width - lx), min(rh, stored.height - ly)
    out = np.asarray(Image.fromarray(px).resize((ow, oh), Image.Resampling.BOX))
    if inside_w >= rw and inside_h >= rh:
        return out, np.ones((oh, ow), bool)
    inside = np.zeros((rh, rw), np.uint8)
    inside[:max(0, inside_h), :max(0, inside_w)] = 255
    return out, np.asarray(Image.fromarray(inside).resize((ow, oh), Image.Resampling.BOX)) >= 128


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

    def read(ox: int, oy: int) -> None:
        ow, oh = min(step_x, w - ox), min(step_y, h - oy)
        x0, y0 = math.floor(ox * ds_x), math.floor(oy * ds_y)
        x1, y1 = math.ceil((ox + ow) * ds_x), math.ceil((oy + oh) * ds_y)
        rw = max(1, round((x1 - x0) / lds))
        rh = max(1, round((y1 - y0) / lds))
        got = _region_from_stored(stored, lds, x0, y0, rw, rh, ow, oh) if stored is not None else None
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


def compute_mask(row: SlideRow, cfg: MaskConfig, lake_root: str, run_id: str,
                 phash: str, threads: int = 1, qc: bool = True, storage: StorageConfig | None = None) -> MaskRow:
    """Make (or take the user's) overlay of one slide and return its ``masks`` row.

    A slide without mpp gets a mask made as if level 0 were :data:`NOMINAL_MPP` µm/px (said in
    ``algorithm``; ``mask_mpp_x/y`` stay null). Never raises: failures (unreadable slide or
    overlay) give ``status='error'`` and the message in ``error``.

    Args:
        row: a ``slides`` row (``slide_id``, ``path``, ``fingerprint``, ``width``, ``height``,
            ``mpp_x``, ``mpp_y``, ``attributes``; ``vendor`` and ``levels`` for ranged reads).
        cfg, lake_root, run_id, phash: settings, lake root, run id, :func:`params_hash`.
        threads: threads reading the slide (:func:`read_slide_at`).
        qc: draw the QC picture (``qc_path``: thumbnail and mask outline) now; false when the
            caller draws it later (a tiling run, with its tiles). The path is in the row either way.
        storage: how an ``s3://`` overlay root is reached.
    """
    from datetime import datetime, timezone

    out: dict[str, Any] = {f.name: None for f in MASKS_SCHEMA.fields}
    out.update(slide_id=row["slide_id"], path=row["path"], fingerprint=row["fingerprint"],
               params_hash=phash, run_id=run_id, status="error",
               slide_width=int(row["width"]) if row["width"] is not None else None,
               slide_height=int(row["height"]) if row["height"] is not None else None,
               created_at=datetime.now(timezone.utc).replace(tzinfo=None))
    try:
        out.update(_compute_mask(row, cfg, lake_root, phash, threads, qc, storage))
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


def _read_at_mask_size(path: str, size: tuple[int, int], cfg: MaskConfig, threads: int,
                       storage: StorageConfig | None = None, slide: dict | None = None
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """The slide at ``path`` read at ``size`` (w, h) (:func:`read_slide_at`, from the file's own
    tiles when ``cfg.reader`` allows), and the pyramid level it was read from. An ``s3://``
    slide is read from its copy in this machine's cache; without one, a slide whose ``slides``
    row (``slide``: ``vendor``, ``levels``) the native reader takes is read by ranged GETs
    (:class:`slidelake.native.LevelGeometry`), any other from a copy made then."""
    import openslide

    from slidelake.native import NATIVE_VENDORS, LevelGeometry, NativeSlide

    local = cached_copy(path, storage) if is_remote(path) else path
    levels = (slide or {}).get("levels")
    if local is None and cfg.reader == "auto" and (slide or {}).get("vendor") in NATIVE_VENDORS and levels is not None \
            and len(levels):
        osr: Any = LevelGeometry(list(levels), lambda: openslide.OpenSlide(local_copy(path, storage)[0]))
        native = NativeSlide(RangedFile(path, storage), osr.level_dimensions, slide["vendor"], 0)
    else:
        local = local or local_copy(path, storage)[0]
        osr = openslide.OpenSlide(local)
        native = _native_of(local, osr) if cfg.reader == "auto" else None
    try:
        rgb, valid = read_slide_at(osr, size, cfg.chunk_px, threads, native)
        w0, h0 = osr.dimensions
        return rgb, valid, int(osr.get_best_level_for_downsample(min(w0 / size[0], h0 / size[1])))
    finally:
        osr.close()
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
                cfg: MaskConfig, threads: int = 1, storage: StorageConfig | None = None,
                slide: dict | None = None) -> MaskPixels:
    """Read a slide at the mask size and threshold it (:func:`mask_size`, :func:`read_slide_at`,
    :func:`tissue_mask`); nothing is written. ``width0``, ``height0``: level-0 px; ``mpp_x``,
    ``mpp_y``: level-0 µm/px, None for a slide without mpp (the mask then assumes
    :data:`NOMINAL_MPP`, said in ``info["algorithm"]``); ``storage``: how an ``s3://`` slide
    is reached; ``slide``: its ``slides`` row, whose ``vendor`` and ``levels`` let a slide in a
    bucket be read by ranged GETs (:func:`_read_at_mask_size`).

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
                        f"masks.max_megapixels={cfg.max_megapixels:g}; raise --mask-mpp (masks.mpp) or the limit")
    rgb, valid, level = _read_at_mask_size(path, (w, h), cfg, threads, storage, slide)
    mpp = (mx * width0 / w, my * height0 / h)
    labels, info = tissue_mask(rgb, valid, mpp, cfg)
    if not known:
        info["algorithm"] += f" (slide has no mpp: {NOMINAL_MPP} µm/px assumed for the mask)"
    return MaskPixels(rgb, labels, info, mpp, level)


def _compute_mask(row: dict[str, Any], cfg: MaskConfig, lake_root: str, phash: str, threads: int,
                  qc: bool, storage: StorageConfig | None) -> dict[str, Any]:
    W0, H0 = int(row["width"]), int(row["height"])
    folder = overlay_dir(lake_root, row["slide_id"])
    user = user_overlay_path(row["path"], row.get("attributes"), cfg, storage)
    if user is not None:
        labels, _ = read_overlay(user, storage)
        h, w = labels.shape
        rgb, _valid, level = _read_at_mask_size(row["path"], (w, h), cfg, threads, storage, row)
        res: dict[str, Any] = dict(source="user", mask_path=user, algorithm="user overlay",
                                   params=json.dumps({"overlay": user}))
    else:
        px = mask_pixels(row["path"], W0, H0, row["mpp_x"], row["mpp_y"], cfg, threads, storage, row)
        rgb, labels, level = px.rgb, px.labels, px.level
        h, w = labels.shape
        mask_path = computed_overlay_path(lake_root, row["slide_id"], phash)
        write_overlay(mask_path, labels, px.mpp, storage=storage)
        res = dict(source="computed", mask_path=mask_path, algorithm=px.info["algorithm"],
                   params=json.dumps(cfg.algorithm_dict(), sort_keys=True),
                   polarity=px.info["polarity"], thresholds=px.info["thresholds"])
    thumb = join(folder, f"thumbnail-{phash}.jpg")
    write_bytes(thumb, encode_picture(rgb, "JPEG", quality=90), storage)
    qc_file = join(folder, f"qc-{phash}.png")
    if qc:
        # the outline is drawn on the thumbnail's pixels, no longer needed; zlib level 1 (~5x faster than 6, lossless)
        picture = qc_picture(rgb, labels, inplace=True, polarity=res.get("polarity"))
        write_bytes(qc_file, encode_picture(picture, "PNG", compress_level=1), storage)
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
              threads: int = 1, qc: bool = True, storage: StorageConfig | None = None) -> dict[str, Any]:
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
    row = compute_mask(rec, cfg, lake_root, run_id, phash, threads, qc, storage)
    if on_profile is not None:
        fig = {"masks.s": time.perf_counter() - t0, "masks.slides": 1.0}
        if worker:
            fig["masks.worker_peak_mib"] = peak_rss_mib()
        on_profile(fig)
    if worker:
        release_memory()  # the worker is reused by the decode stage next
    return row


def compute_masks_on_driver(slides: list[SlideRow], cfg: MaskConfig, lake_root: str, run_id: str,
                            on_profile: Callable[[dict[str, float]], None] | None = None,
                            qc: bool = True, storage: StorageConfig | None = None) -> list[MaskRow]:
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
                         readers, qc, storage)

    with ThreadPoolExecutor(max_workers=max(1, min(len(slides), cores))) as pool:
        return list(pool.map(one, slides))


def make_masks(spark: SparkSession, slides: list[SlideRow], cfg: MaskConfig, lake_root: str,
               run_id: str, on_profile: Callable[[dict[str, float]], None] | None = None,
               qc: bool = True, storage: StorageConfig | None = None) -> DataFrame:
    """Compute the masks of ``slides`` (``slides`` rows as dicts), one Spark task per slide
    (``qc`` and ``storage`` as :func:`compute_mask`).

    ``on_profile({"masks.s": seconds, "masks.slides": 1, "masks.worker_peak_mib": MiB})`` is
    called once per slide (``--profile``; the peak is the worker's resident set while it made
    this mask, :mod:`slidelake.memory`).

    Returns:
        A DataFrame of ``masks`` rows (:data:`MASKS_SCHEMA`), one per slide, in any order.
    """
    phash = params_hash(cfg)
    fields = ["slide_id", "path", "fingerprint", "width", "height", "mpp_x", "mpp_y", "attributes", "vendor", "levels"]
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
            rows = [_mask_row(rec, cfg, lake_root, run_id, phash, on_profile, True, 1, qc, storage)
                    for rec in pdf.to_dict("records")]
            yield pd.DataFrame(rows, columns=MASKS_SCHEMA.fieldNames())

    spark.sparkContext.setJobDescription("masks")
    return df.mapInPandas(run, schema=MASKS_SCHEMA)


def mask_slides(lake: Lake, cfg: PipelineConfig, rec: RunRecord, slides: list[SlideRow],
                on_profile: Callable[[dict[str, float]], None] | None = None, qc: bool = True,
                progress: bool = False) -> dict[str, MaskRow]:
    """The masks stage: make sure each of ``slides`` (``slides`` rows) has a tissue mask.

    A mask whose slide content (``slide_id`` is the content hash) and algorithm settings
    (:func:`params_hash`) are unchanged, and whose overlay file still exists, is reused; the
    others are computed (one Spark task per slide, or on the driver for fewer than
    ``masks.on_driver_below`` slides) and merged into the ``masks`` table in one commit (rows of
    the same slide and ``params_hash`` are replaced). User overlays are re-read every run.
    Slides whose mask fails are recorded in ``rec.slide_errors`` (stage ``masks``).
    ``on_profile`` receives the per-slide figures of :func:`make_masks` (``--profile``);
    ``qc`` false leaves the new masks' QC pictures to the caller (a tiling run draws them with
    its tiles, :func:`slidelake.qc.draw_qc`). ``progress`` shows the slides masked on stderr.

    Returns:
        ``{slide_id: masks row}`` for every slide with an ``ok`` mask.
    """
    from slidelake.lineage import SumLog
    from slidelake.progress import StageProgress
    from slidelake.resolution import with_assumed_mpp
    from slidelake.tables import sql_in

    done = lake.spark.sparkContext.accumulator({}, SumLog()) if progress else None
    if done is not None:  # the per-slide figures feed the progress too
        def report(fig: dict[str, float], profile=on_profile, done=done) -> None:
            if profile is not None:
                profile(fig)
            done.add({"masks.slides": fig.get("masks.slides", 0.0)})

        on_profile = report

    phash = params_hash(cfg.masks)
    slides = [with_assumed_mpp(r, cfg.resolution.assumed_mpp) for r in slides]
    with rec.stage("masks"):
        ids = {r["slide_id"] for r in slides}
        reuse = {m["slide_id"]: m for m in lake.read_rows("masks", MASKS_SCHEMA)
                 if m["params_hash"] == phash and m["status"] == "ok" and m["source"] == "computed"
                 and m["slide_id"] in ids and m["mask_path"] and exists(m["mask_path"], lake.storage)}
        todo = [r for r in slides if r["slide_id"] not in reuse]
        with StageProgress(lake.spark, "slides masked", len(todo),
                           lambda: int(done.value.get("masks.slides", 0)) if done is not None else 0, progress):
            if len(todo) < cfg.masks.on_driver_below:  # a Spark job's start-up costs more than a mask
                made = compute_masks_on_driver(todo, cfg.masks, lake.overlays, rec.run_id, on_profile, qc, lake.storage)
            else:
                made = [m.asDict(recursive=True) for m in make_masks(
                    lake.spark, todo, cfg.masks, lake.overlays, rec.run_id, on_profile, qc, lake.storage).collect()]
        if made:
            # replace the rows of these slides and settings only (concurrent runs keep theirs)
            where = f"params_hash = '{phash}' AND " + sql_in("slide_id", [m["slide_id"] for m in made])
            res = lake.write_rows("masks", made, MASKS_SCHEMA, mode="overwrite", replace_where=where)
            rec.table_versions["masks"] = res.version if res.version is not None else -1
    failed = [m for m in made if m["status"] != "ok"]
    rec.counts.update(masks_computed=len(made) - len(failed), masks_reused=len(reuse), masks_failed=len(failed))
    for m in failed:
        rec.slide_error(m, "masks", m["error"])
    return {**reuse, **{m["slide_id"]: m for m in made if m["status"] == "ok"}}


__all__ = [
    "MASKS_SCHEMA", "NOMINAL_MPP", "params_hash", "read_slide_at", "MaskPixels", "mask_pixels", "compute_mask",
    "compute_masks_on_driver", "make_masks", "mask_slides",
]
