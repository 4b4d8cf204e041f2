"""The slidelake pipeline, top to bottom:

discover -> masks -> resolve -> grid -> overlap -> filter before decode -> repartition ->
decode -> pixel filter -> write -> commit -> QC -> runs row (also when the run fails).

:func:`run_discover`, :func:`run_masks`, :func:`run_tile` and :func:`run_all` are the jobs; each
returns the :class:`~slidelake.lineage.RunRecord` it wrote to the ``runs`` table. The stages
live in the modules named after them (:mod:`slidelake.slides`, :mod:`slidelake.masks`,
:mod:`slidelake.resolution`, :mod:`slidelake.grid`, :mod:`slidelake.overlap`,
:mod:`slidelake.decode`, :mod:`slidelake.filtering`, :mod:`slidelake.write`,
:mod:`slidelake.qc`); the tables are owned by :class:`~slidelake.lake.Lake`.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from slidelake import __version__
from slidelake.config import PipelineConfig, config_hash
from slidelake.decode import repartition_tiles
from slidelake.grid import band_tiles, expand_grid, grid_constants, grid_size
from slidelake.incremental import (
    ConfigMismatchError, check_config_mix, slide_counts, tiled_before, write_run_slides, write_tile_errors,
)
from slidelake.lake import Lake
from slidelake.lineage import RUNS_SCHEMA, RunRecord, SumLog, versions
from slidelake.masks import mask_slides
from slidelake.annotations import annotation_path
from slidelake.overlap import SlideInputs, overlap_tiles
from slidelake.progress import StageProgress
from slidelake.qc import draw_qc, draw_qc_after_failure
from slidelake.resolution import resolve_row
from slidelake.rows import MaskRow, ResolvedSlide, SlideRow, spark_schema
from slidelake.slides import SLIDES_SCHEMA, discover_slides, listed_slides, select_rows_for_tiling
from slidelake.spark import local_frame
from slidelake.storage import is_remote
from slidelake.tables import to_stored
from slidelake.write import TILES_COLUMNS, Lineage, TileWrite, write_tiles

# grid tiles per band of the grid + overlap stage (grid.band_tiles): a batch's grid is spread
# over the cores in bands of rows of at most GRID_TILES_PER_TASK tiles (the overlap stage runs
# ~100,000 tiles/s per task, docs/benchmarks.md) and at least GRID_TILES_PER_TASK_MIN
GRID_TILES_PER_TASK = 65_536
GRID_TILES_PER_TASK_MIN = 4_096


# -------------------------------------------------------------------------------- tiling

def tile_slides(lake: Lake, cfg: PipelineConfig, rec: RunRecord, slides: list[SlideRow], replace_table: bool = False,
                progress: bool = False, profile: bool = False, force: bool = False) -> None:
    """The tiling stages on ``slides`` rows (``ok`` rows are tiled, once per ``slide_id``):
    resolve, skip slides already tiled, masks, then per batch of ``tables.slides_per_commit``
    slides: grid, overlap, filter before decode, repartition, decode, pixel filter, write and
    commit the tiles table partitioned by ``slide_id``, ``tile_errors`` and ``run_slides``;
    then the QC pictures.

    **Incremental**: a slide whose content was already tiled into this tiles table with the
    same tiling config (``config_hash``) is skipped unless ``force``
    (:func:`slidelake.incremental.tiled_before`). Each batch's tiles are committed before its
    ``run_slides`` rows, so a run killed half way is finished by running it again: committed
    batches are skipped, a batch whose commit was lost is redone, and its partitions are
    replaced, never duplicated. A slide with zero kept tiles ends with none. Slides that fail
    resolution (or their mask) are recorded in ``rec.slide_errors`` and keep their old tiles.

    ``progress`` shows live tile counts; ``profile`` records seconds and tiles per stage,
    summed over the Python workers, into ``rec.profile`` (``runs.profile``).

    Raises:
        ConfigMismatchError: the table holds other slides' tiles of another config and
            ``replace_table`` is false.
    """
    spark = lake.spark
    with rec.stage("resolve"):  # a few rows per slide: on the driver, no Spark job
        resolved = [{**r, **resolve_row(r, cfg.resolution)} for r in select_rows_for_tiling(slides)]
    good = [r for r in resolved if r["resolution_error"] is None]
    for r in resolved:
        if r["resolution_error"] is not None:
            rec.slide_error(r, "resolution", r["resolution_error"])
    done = set() if force or replace_table else tiled_before(lake, rec.config_hash)
    rec.counts["slides_skipped"] = sum(1 for r in good if r["slide_id"] in done)
    good = [r for r in good if r["slide_id"] not in done]
    prof_acc = spark.sparkContext.accumulator({}, SumLog()) if profile else None
    on_profile = prof_acc.add if prof_acc is not None else None
    masks: dict[str, MaskRow] = {}
    if cfg.masks.enabled and good:
        masks = mask_slides(lake, cfg, rec, good, on_profile, qc=False, progress=progress)  # QC drawn with the tiles
        good = [r for r in good if r["slide_id"] in masks]
    generated = {r["slide_id"]: _grid_tiles(r, cfg) for r in good}
    try:
        if not replace_table:
            check_config_mix(lake, rec.config_hash, [r["slide_id"] for r in good])
        rects = _tile_batches(lake, cfg, rec, good, slides, masks, generated, replace_table, progress, on_profile)
    except BaseException:
        # a failed run still leaves each new mask's QC picture (outline, no tiles)
        draw_qc_after_failure({sid: m for sid, m in masks.items() if m.get("run_id") == rec.run_id}, lake.storage)
        raise
    with rec.stage("qc"):
        draw_qc({r["slide_id"]: masks[r["slide_id"]] for r in good if r["slide_id"] in masks}, rects, lake.storage)
    counts = rec.slide_counts
    total, written = sum(generated.values()), sum(c["tiles_written"] for c in counts)
    if prof_acc is not None:
        rec.profile = {**(rec.profile or {}), **{k: float(v) for k, v in prof_acc.value.items()},
                       **{f"wall.{k}": v for k, v in rec.stage_seconds.items()},
                       "tiles.generated": float(total), "tiles.written": float(written)}
    rec.counts.update(
        slides_tiled=len(good), tiles_generated=total, tiles_written=written,
        **{k: sum(c[k] for c in counts) for k in ("tiles_skipped", "tiles_decoded", "tiles_failed", "tiles_filtered")},
    )


def _tile_batches(lake: Lake, cfg: PipelineConfig, rec: RunRecord, good: list[ResolvedSlide], slides: list[SlideRow],
                  masks: dict[str, MaskRow], generated: dict[str, int], replace_table: bool, progress: bool,
                  on_profile: Callable | None) -> dict[str, np.ndarray]:
    """Tile ``good`` (resolved rows) in batches of ``tables.slides_per_commit``, one commit
    each; tiles of content no longer in the ``slides`` table (a file rewritten since it was
    tiled) are removed with the first commit. Fills ``rec.slide_counts``.

    Returns:
        This run's kept tiles' rectangles by slide (level-0 px).
    """
    current = {r["slide_id"] for r in lake.read_rows("slides", SLIDES_SCHEMA)} | {r["slide_id"] for r in slides}
    stale = sorted(lake.partition_values("tiles") - current)
    step = cfg.tables.slides_per_commit
    batches = [good[i:i + step] for i in range(0, len(good), step)] or ([[]] if replace_table or stale else [])
    # grid tiles done by slide (dropped before decode, or decoded): the live progress only
    done_acc = lake.spark.sparkContext.accumulator({}, SumLog())
    rects: dict[str, np.ndarray] = {}
    lineage = Lineage(rec.run_id, rec.config_hash, __version__, rec.started_at, lake.path_root)
    with StageProgress(lake.spark, "grid tiles", sum(generated.values()), lambda: int(sum(done_acc.value.values())),
                       enabled=progress):
        for i, batch in enumerate(batches):
            with rec.stage("overlap+decode+write"):
                overlay = {r["slide_id"]: masks[r["slide_id"]]["mask_path"] if r["slide_id"] in masks else None
                           for r in batch}
                planned = plan_tiles(lake.spark, cfg, batch, overlay, on_profile, done_acc.add)
                # tasks sized by the tiles expected to be decoded, not by the grid (masks drop most)
                expected = sum(generated[r["slide_id"]] * (_tissue_share(masks.get(r["slide_id"]))
                                                           if cfg.filter.min_tissue_fraction is not None else 1.0)
                               for r in batch)
                tiles = repartition_tiles(planned, cfg.partition, expected)
                replace = None if replace_table and i == 0 else [r["slide_id"] for r in batch] + (stale if i == 0 else [])
                # decode -> pixel filter -> write (in the Python workers) -> commit (one Delta commit)
                remote = {r["path"]: (r["vendor"], [(v["width"], v["height"]) for v in r["levels"]])
                          for r in batch if is_remote(r["path"])}
                wrote = write_tiles(lake, tiles, cfg.decode, cfg.filter, lineage, replace, cfg.tables.tile_compression,
                                    done_acc.add, on_profile, cfg.tables.direct_io, remote)
            rects.update(wrote.rects)
            _record_batch(lake, rec, batch, generated, wrote, replace_table and i == 0)
    return rects


def _record_batch(lake: Lake, rec: RunRecord, batch: list[ResolvedSlide], generated: dict[str, int], wrote: TileWrite,
                  replaced_table: bool) -> None:
    """After a batch's tiles commit: its counts, ``tile_errors`` and ``run_slides`` rows."""
    version = wrote.result.version if wrote.result.version is not None else -1
    rec.table_versions[lake.tiles_table] = version
    counts = slide_counts(rec, batch, generated, wrote.result.rows_by_partition, wrote.decoded, wrote.failed,
                          wrote.failures)
    with rec.stage("write"):
        write_tile_errors(lake, rec, batch, wrote.failures)
        write_run_slides(lake, rec, batch, counts, version, replaced_table)
    rec.slide_counts += counts


def plan_tiles(spark: SparkSession, cfg: PipelineConfig, batch: list[ResolvedSlide], overlay: dict[str, str | None],
               on_profile: Callable | None = None, on_skipped: Callable | None = None) -> DataFrame:
    """Grid, overlap and filter before decode of a batch (resolved slide rows), with the
    slides' own columns joined back (lazy: no Spark job runs; the slide rows are in the plan).

    Args:
        overlay: ``slide_id`` -> overlay path (the slide's mask) or None.
        on_profile, on_skipped: see :func:`slidelake.overlap.make_overlap`.

    Returns:
        A DataFrame of kept tile rows with the decode inputs and every non-pixel tiles column,
        ``tile_id`` included (a hash of slide, config and position, so it does not depend on
        where the row is computed).
    """
    grid_cfg, fcfg, ann = cfg.grid, cfg.filter, cfg.annotations
    schema = spark_schema(ResolvedSlide)
    notes = {r["slide_id"]: annotation_path(r["path"], r["attributes"], ann.column, ann.sidecar_suffix, cfg.storage)
             if ann.enabled else None for r in batch}
    sides = T.StructType([T.StructField("overlay_path", T.StringType()),
                          T.StructField("annotations_path", T.StringType())])
    # held in the plan (no Spark job to broadcast it below, no Python worker to read it)
    resolved = local_frame(spark, [
        (*(r[f] for f in schema.fieldNames()), overlay[r["slide_id"]], notes[r["slide_id"]]) for r in batch
    ], T.StructType(schema.fields + sides.fields))
    base = resolved.select(
        "slide_id", "path", "fingerprint", "attributes", "slide_label", "patient_id", "split",
        "level", "level_downsample", "downsample",
        F.col("tile_mpp_x").alias("mpp_x"), F.col("tile_mpp_y").alias("mpp_y"),
        F.col("tile_mpp_source").alias("mpp_source"), "extent_x", "extent_y",
        F.col("width").alias("slide_width"), F.col("height").alias("slide_height"),
        "overlay_path", "annotations_path",
    )
    ex, ey = grid_cfg.tile_extent  # one tile's region at the read level: once per slide, before the explode
    scale = F.col("downsample") / F.col("level_downsample")
    base = base.withColumns({
        "read_width": F.greatest(F.lit(1), F.round(F.lit(ex) * scale)).cast("int"),
        "read_height": F.greatest(F.lit(1), F.round(F.lit(ey) * scale)).cast("int"),
        **grid_constants(grid_cfg.tile_extent, grid_cfg.stride_xy),
    })
    # grid (metadata only): per-tile columns, the batch's grid rows split in bands over the cores
    per_band = band_tiles(sum(_grid_tiles(r, cfg) for r in batch), spark.sparkContext.defaultParallelism,
                          GRID_TILES_PER_TASK, GRID_TILES_PER_TASK_MIN)
    tiles = expand_grid(spark, batch, grid_cfg.tile_extent, grid_cfg.stride_xy, grid_cfg.last, grid_cfg.roi, per_band)
    # overlap with the mask and annotations, and the filter before decode, in the same task:
    # only tiles that pass are ever decoded (tiles whose overlap failed go on, undecoded, so
    # the write stage records them exactly)
    inputs = {r["slide_id"]: SlideInputs(r["width"], r["height"], r["downsample"], overlay[r["slide_id"]],
                                         notes[r["slide_id"]], cfg.storage) for r in batch}
    min_tissue = fcfg.min_tissue_fraction if cfg.masks.enabled else None
    tiles = overlap_tiles(tiles, inputs, grid_cfg.tile_roi, ann.label_min_fraction, min_tissue,
                          fcfg.min_annotated_fraction, on_profile, on_skipped)
    return tiles.join(F.broadcast(base), "slide_id").withColumn(
        "tile_id", F.xxhash64("slide_id", F.lit(config_hash(cfg)), "tile_x", "tile_y"))


def _grid_tiles(row: ResolvedSlide, cfg: PipelineConfig) -> int:
    """Grid tiles of one resolved slide row (:func:`slidelake.grid.grid_size`)."""
    g = cfg.grid
    return grid_size(row["extent_x"], row["extent_y"], row["downsample"], g.tile_extent, g.stride_xy, g.last, g.roi)


def _tissue_share(mask: MaskRow | None) -> float:
    """Share of a slide's tiles expected to pass the mask: its tissue fraction (1.0 without a
    computed mask; at least 1 %, so a mask that found almost nothing still gets a task)."""
    if mask is None or mask.get("tissue_fraction") is None:
        return 1.0
    return min(1.0, max(0.01, float(mask["tissue_fraction"])))


# ---------------------------------------------------------------------------------- the jobs

def _run(spark: SparkSession, cfg: PipelineConfig, job: str, body: Callable[[Lake, RunRecord], None]) -> RunRecord:
    """Open the lake, run ``body``, and append the ``runs`` row whatever happens."""
    lake = Lake.open(spark, cfg)
    rec = RunRecord(job=job, lake=cfg.lake, config=cfg.model_dump_json(), config_hash=config_hash(cfg),
                    inputs=list(cfg.inputs), versions=versions(spark.version), delta_writer=lake.writer,
                    spark_master=spark.sparkContext.master)
    try:
        body(lake, rec)
        rec.status = "succeeded"
    except BaseException as exc:
        rec.status = "failed"
        rec.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        spark.sparkContext.setJobDescription(None)
        row = rec.row()
        for key in ("slide_counts", "slide_errors"):  # per-slide lists carry paths too
            row[key] = [{**e, "path": to_stored(e.get("path"), lake.path_root)} for e in row[key] or []]
        try:
            lake.write_rows("runs", [row], RUNS_SCHEMA, mode="append")
        except Exception as exc:  # noqa: BLE001 - a failed run's own error is the one to raise
            if rec.status == "succeeded":
                raise
            logging.getLogger(__name__).warning("the runs row of the failed run %s was not written: %s",
                                                rec.run_id, exc)
        if rec.status == "succeeded":
            lake.register()
    return rec


def run_discover(spark: SparkSession, cfg: PipelineConfig, progress: bool = False) -> RunRecord:
    """The discovery job: probe ``cfg.inputs`` into the ``slides`` table."""
    return _run(spark, cfg, "discover", lambda lake, rec: discover_slides(lake, cfg, rec, progress=progress))


def run_masks(spark: SparkSession, cfg: PipelineConfig, progress: bool = False) -> RunRecord:
    """The masks job on slides already in the ``slides`` table (only the listed inputs when
    ``cfg.inputs`` is set): compute missing or outdated tissue masks."""
    return _run(spark, cfg, "masks", lambda lake, rec: mask_slides(
        lake, cfg, rec, select_rows_for_tiling(listed_slides(lake, cfg)), progress=progress))


def run_tile(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False, progress: bool = False,
             profile: bool = False, force: bool = False) -> RunRecord:
    """The tiling job on slides already in the ``slides`` table (only the listed inputs when
    ``cfg.inputs`` is set; masks made when enabled, existing ones reused)."""
    return _run(spark, cfg, "tile", lambda lake, rec: tile_slides(
        lake, cfg, rec, listed_slides(lake, cfg), replace_table, progress, profile, force))


def run_all(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False, progress: bool = False,
            profile: bool = False, force: bool = False) -> RunRecord:
    """Discover ``cfg.inputs``, then make masks (when enabled) and tile the slides found, as one run.

    Incremental: unchanged files are not re-hashed and slides already tiled with this config
    are skipped (:func:`tile_slides`); ``force`` re-probes and re-tiles every listed slide."""
    def body(lake: Lake, rec: RunRecord) -> None:
        found = discover_slides(lake, cfg, rec, force, progress)
        tile_slides(lake, cfg, rec, found, replace_table, progress, profile, force)

    return _run(spark, cfg, "run", body)


def summary(rec: RunRecord) -> str:
    """A short human summary of a run record."""
    c = rec.counts
    parts = [f"run {rec.run_id} {rec.status}"]
    if "slides_discovered" in c:
        parts.append(f"slides: {c['slides_discovered']} found, {c['slides_ok']} ok, {c['slides_error']} error"
                     + (f", {c['slides_unchanged']} unchanged since the last scan" if c.get("slides_unchanged") else ""))
    if c.get("slides_skipped"):
        parts.append(f"slides already tiled with this config, skipped: {c['slides_skipped']} (--force redoes them)")
    config = json.loads(rec.config) if rec.config else {}
    skipped = c.get("slides_skipped") or 0 if config.get("masks", {}).get("enabled") else 0
    if c.get("masks_computed") is not None or skipped:
        parts.append(f"masks: {c.get('masks_computed') or 0} computed, {c.get('masks_reused') or 0} reused, "
                     f"{c.get('masks_failed') or 0} failed" + (f", {skipped} not needed (slides already tiled)"
                                                             if skipped else ""))
    if "tiles_generated" in c:
        parts.append(
            f"tiles: {c['tiles_generated']} generated, {c['tiles_skipped']} skipped before decode, "
            f"{c['tiles_decoded']} decoded, {c['tiles_filtered']} filtered, {c['tiles_failed']} failed, "
            f"{c['tiles_written']} written from {c['slides_tiled']} slide(s)"
        )
    parts += _resolution_notes(rec, config.get("resolution", {}))
    for e in rec.slide_errors[:10]:
        parts.append(f"  ! {e['stage']}: {e['path']}: {e['error']}")
    if len(rec.slide_errors) > 10:
        parts.append(f"  ... {len(rec.slide_errors) - 10} more errors in the runs table")
    return "\n".join(parts)


def _resolution_notes(rec: RunRecord, res: dict, most: int = 10) -> list[str]:
    """Summary lines of the slides tiled at an mpp more than 1 % from the one requested in
    ``res`` (the run's ``resolution`` settings; an ``mpp`` or ``magnification`` request,
    ``10 / magnification`` µm/px): the level read and the tiles' effective mpp, e.g. an NDPI
    asked 0.5 µm/px and read at 0.456."""
    want = res.get("mpp") or (10.0 / res["magnification"] if res.get("magnification") else None)
    if not want:
        return []
    off = [c for c in rec.slide_counts if c.get("mpp_x") and abs(c["mpp_x"] - want) / want > 0.01]
    lines = [f"  ~ {c['path']}: tiles at {c['mpp_x']:.3f} µm/px from level {c['level']} (asked {want:g})"
             for c in off[:most]]
    return lines + ([f"  ... {len(off) - most} more slides in runs.slide_counts"] if len(off) > most else [])


__all__ = ["run_discover", "run_masks", "run_tile", "run_all", "tile_slides", "plan_tiles", "summary",
           "ConfigMismatchError", "TILES_COLUMNS"]
