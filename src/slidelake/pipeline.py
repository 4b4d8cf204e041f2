"""The slidelake pipeline, top to bottom:

discover -> masks -> resolve resolution -> expand grid -> overlap (masks, annotations) ->
filter before decode -> repartition -> decode -> pixel filter -> write, with a ``runs`` row
recording what happened (also when the run fails).

:func:`run_discover`, :func:`run_masks` and :func:`run_tile` are the jobs; :func:`run_all`
does them all. Each returns the :class:`~slidelake.lineage.RunRecord` it wrote to
``<lake>/runs``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from slidelake import __version__
from slidelake.config import PipelineConfig, config_hash
from slidelake.decode import repartition_tiles
from slidelake.grid import band_tiles, banded_grid, grid_constants, grid_size, level0_rects
from slidelake.lineage import (
    RUN_SLIDES_SCHEMA, RUNS_SCHEMA, TILE_ERRORS_SCHEMA, CountLog, RunRecord, SumLog, utcnow, versions,
)
from slidelake.masks import MASKS_SCHEMA, compute_masks_on_driver, make_masks, params_hash, qc_picture
from slidelake.overlap import SlideInputs, annotation_path, overlap_tiles
from slidelake.progress import TileProgress
from slidelake.resolution import resolve_row, resolved_schema
from slidelake.slides import SLIDES_SCHEMA, discover, list_inputs, select_rows_for_tiling
from slidelake.spark import local_frame
from slidelake.tables import (
    partition_values, read_columns, read_rows, register_tables, resolve_writer, sql_in, to_stored, write_rows,
)
from slidelake.write import TILES_COLUMNS, Lineage, TileWrite, write_tiles  # noqa: F401 - TILES_COLUMNS re-exported

# failed tiles listed per slide in runs.slide_errors
MAX_ERROR_SAMPLES = 20
# grid tiles per band of the grid + overlap stage (grid.band_tiles): a batch's grid is spread
# over the cores in bands of rows of at most GRID_TILES_PER_TASK tiles (the overlap stage runs
# ~100,000 tiles/s per task, docs/benchmarks.md) and at least GRID_TILES_PER_TASK_MIN
GRID_TILES_PER_TASK = 65_536
GRID_TILES_PER_TASK_MIN = 4_096


class ConfigMismatchError(RuntimeError):
    """The tiles table holds tiles of other slides made with a different tiling config."""


def lake_root(cfg: PipelineConfig) -> str:
    """Absolute path (or URI) of the lake root; mask overlays live under ``<root>/overlays``."""
    return cfg.lake if "://" in cfg.lake else os.path.abspath(cfg.lake)


def overlay_root(cfg: PipelineConfig) -> str:
    """Folder holding ``overlays/<slide_id>/`` mask files: ``masks.overlay_root`` or the lake root."""
    root = cfg.masks.overlay_root
    return os.path.abspath(root) if root else lake_root(cfg)


def lake_paths(cfg: PipelineConfig) -> dict[str, str]:
    """Absolute (or URI) paths of the lake's tables: ``slides``, ``masks``, ``tiles``,
    ``tile_errors``, ``run_slides``, ``runs``."""
    root = lake_root(cfg)
    return {"slides": f"{root}/slides", "masks": f"{root}/masks",
            "tiles": f"{root}/{cfg.tables.tiles_table}", "tile_errors": f"{root}/tile_errors",
            "run_slides": f"{root}/run_slides", "runs": f"{root}/runs"}


@contextmanager
def _stage(rec: RunRecord, name: str) -> Iterator[None]:
    """Time a pipeline stage into ``rec.stage_seconds`` and name its Spark jobs after it."""
    t = time.perf_counter()
    active = SparkSession.getActiveSession()
    if active is not None:
        active.sparkContext.setJobDescription(name)
    try:
        yield
    finally:
        rec.stage_seconds[name] = rec.stage_seconds.get(name, 0.0) + time.perf_counter() - t


def _new_record(spark: SparkSession, cfg: PipelineConfig, job: str, writer: str) -> RunRecord:
    rec = RunRecord(
        job=job, lake=cfg.lake, config=cfg.model_dump_json(), config_hash=config_hash(cfg),
        inputs=list(cfg.inputs),
    )
    rec.versions = versions(spark.version)
    rec.delta_writer = writer
    rec.spark_master = spark.sparkContext.master
    return rec


def _write_run(spark: SparkSession, rec: RunRecord, paths: dict[str, str], writer: str,
               root: str | None = None) -> None:
    row = rec.row()
    if root:  # per-slide lists carry paths too
        for key in ("slide_counts", "slide_errors"):
            row[key] = [{**e, "path": to_stored(e.get("path"), root)} for e in row[key] or []]
    write_rows(spark, [row], RUNS_SCHEMA, paths["runs"], writer, mode="append", description="write runs")


# ---------------------------------------------------------------------------------- discover

def discover_slides(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord, force: bool = False) -> list[dict]:
    """Discovery stage: list the inputs, probe the files, merge into ``<lake>/slides``.

    A path whose ``slides`` row is ``ok`` and whose size and modification time are unchanged
    keeps its row (no re-hashing: a nightly scan of an archive reads only new or changed
    files); ``force`` probes every file again. Rows of paths scanned again replace their
    previous rows (no duplicates); other rows are kept. A ``resolution.assumed_mpp`` fills mpp
    (``mpp_source='assumed'``) for readable slides that have none.

    Returns:
        The rows of this scan as dicts (:data:`~slidelake.slides.SLIDES_SCHEMA`), one per path.
    """
    from slidelake.slides import unchanged_since

    paths = lake_paths(cfg)
    writer = rec.delta_writer or "delta-rs"
    with _stage(rec, "discover"):
        listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive,
                             cfg.discovery.exclude)
        previous = read_rows(spark, paths["slides"], writer, SLIDES_SCHEMA, cfg.tables.path_root)
        before = {r["path"]: r for r in previous}
        now = utcnow()
        reused, fresh = [], []
        for i, (p, attrs) in enumerate(zip(listed["path"], listed["attributes"])):
            old = before.get(p)
            if not force and old is not None and unchanged_since(old, p):
                r = {**old, "attributes": dict(attrs or {}), "run_id": rec.run_id, "discovered_at": now}
                if r["mpp_source"] == "assumed":  # re-applied below from this run's config
                    r.update(mpp_x=None, mpp_y=None, mpp_source=None)
                reused.append(r)
            else:
                fresh.append(i)
        rows = discover(spark, listed.iloc[fresh].reset_index(drop=True), rec.run_id,
                        cfg.discovery.on_driver_below, cfg.discovery.properties) + reused
        assumed = cfg.resolution.assumed_mpp
        for r in rows:
            if assumed is not None and r["status"] == "ok" and r["mpp_x"] is None:
                r.update(mpp_x=float(assumed), mpp_y=float(assumed), mpp_source="assumed")
    with _stage(rec, "write"):
        # replace the rows of the scanned paths only: a concurrent run scanning other paths keeps its rows
        res = write_rows(spark, rows, SLIDES_SCHEMA, paths["slides"], writer, mode="overwrite",
                         description="write slides", path_root=cfg.tables.path_root,
                         replace_where=sql_in("path", [to_stored(r["path"], cfg.tables.path_root) for r in rows]))
        rec.table_versions["slides"] = res.version if res.version is not None else -1
    n_ok = sum(1 for r in rows if r["status"] == "ok")
    rec.counts.update(slides_discovered=len(rows), slides_ok=n_ok, slides_error=len(rows) - n_ok,
                      slides_unchanged=len(reused))
    rec.slide_errors += [
        {"slide_id": r["slide_id"], "path": r["path"], "stage": "discover", "error": r["error"]}
        for r in rows if r["status"] != "ok"
    ]
    return rows


# ------------------------------------------------------------------------------------- masks

def mask_slides(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord, slides: list[dict],
                on_profile: Callable[[dict[str, float]], None] | None = None, qc: bool = True) -> dict[str, dict]:
    """Masks stage: make sure each of ``slides`` (``slides`` rows as dicts) has a tissue mask.

    A mask whose slide content (``slide_id`` is the content hash) and algorithm settings
    (``params_hash``) are unchanged, and whose overlay file still exists, is reused; the others
    are computed (one Spark task per slide; fewer than ``masks.on_driver_below`` slides on the
    driver, :func:`slidelake.masks.compute_masks_on_driver`) and merged into ``<lake>/masks`` in one commit
    (rows of the same slide and ``params_hash`` are replaced). User overlays are re-read every
    run. Slides whose mask fails are recorded in ``rec.slide_errors`` (stage ``masks``).
    ``on_profile`` receives the per-slide figures of :func:`slidelake.masks.make_masks`
    (``--profile``). ``qc`` false leaves the new masks' QC pictures to the caller (a tiling
    run draws them once, with its tiles, :func:`draw_qc`).

    Returns:
        ``{slide_id: masks row}`` for every slide with an ``ok`` mask.
    """
    paths = lake_paths(cfg)
    writer = rec.delta_writer or "delta-rs"
    phash = params_hash(cfg.masks)
    assumed = cfg.resolution.assumed_mpp
    slides = [dict(r) for r in slides]
    for r in slides:
        if assumed is not None and r.get("mpp_x") is None:
            r.update(mpp_x=float(assumed), mpp_y=float(assumed))
    with _stage(rec, "masks"):
        existing = read_rows(spark, paths["masks"], writer, MASKS_SCHEMA, cfg.tables.path_root)
        ids = {r["slide_id"] for r in slides}
        prior = {m["slide_id"]: m for m in existing
                 if m["params_hash"] == phash and m["status"] == "ok" and m["source"] == "computed"
                 and m["slide_id"] in ids}
        reuse = {sid: m for sid, m in prior.items()
                 if m["mask_path"] and os.path.isfile(m["mask_path"])}
        todo = [r for r in slides if r["slide_id"] not in reuse]
        if len(todo) < cfg.masks.on_driver_below:  # a Spark job's start-up costs more than a mask
            made = compute_masks_on_driver(todo, cfg.masks, overlay_root(cfg), rec.run_id, on_profile, qc)
        else:
            made = [m.asDict(recursive=True)
                    for m in make_masks(spark, todo, cfg.masks, overlay_root(cfg), rec.run_id, on_profile, qc).collect()]
        if made:
            # replace the rows of these slides and settings only (concurrent runs keep theirs)
            where = f"params_hash = '{phash}' AND " + sql_in("slide_id", [m["slide_id"] for m in made])
            res = write_rows(spark, made, MASKS_SCHEMA, paths["masks"], writer, mode="overwrite", path_root=cfg.tables.path_root,
                             description="write masks", replace_where=where)
            rec.table_versions["masks"] = res.version if res.version is not None else -1
    ok = {**reuse, **{m["slide_id"]: m for m in made if m["status"] == "ok"}}
    failed = [m for m in made if m["status"] != "ok"]
    rec.counts.update(
        masks_computed=sum(1 for m in made if m["status"] == "ok"),
        masks_reused=len(reuse), masks_failed=len(failed),
    )
    rec.slide_errors += [
        {"slide_id": m["slide_id"], "path": m["path"], "stage": "masks", "error": m["error"]} for m in failed
    ]
    return ok


def _write_tile_errors(spark: SparkSession, path: str, writer: str, rec: RunRecord, chash: str,
                      slides: list[dict], failures: dict[str, list[dict]], path_root: str | None = None) -> None:
    """Append this run's failed tiles to ``<lake>/tile_errors`` (one commit; the table is
    created empty on the first run so it can always be queried)."""
    from slidelake.tables import table_exists

    by_id = {r["slide_id"]: r for r in slides}
    now = utcnow()
    rows = [
        {"run_id": rec.run_id, "slide_id": sid, "path": by_id[sid]["path"], "config_hash": chash,
         "level": by_id[sid]["level"], "tile_x": f["tile_x"], "tile_y": f["tile_y"], "stage": f.get("stage", "decode"),
         "error": f["error"], "created_at": now}
        for sid, fails in failures.items() if sid in by_id for f in fails
    ]
    if rows or not table_exists(path):
        res = write_rows(spark, rows, TILE_ERRORS_SCHEMA, path, writer, mode="append", description="write tile_errors",
                         path_root=path_root)
        rec.table_versions["tile_errors"] = res.version if res.version is not None else -1


def draw_qc(spark: SparkSession | None, tiles_path: str | None, writer: str, masks: dict[str, dict],
            run_id: str | None, rects: dict[str, np.ndarray] | None = None) -> None:
    """Draw each slide's QC picture (``masks.qc_path``) with the tiles this run kept.

    The tiles' in-slide rectangles, ``rects`` (``{slide_id: (n, 4) array}`` of ``(x0, y0, x1,
    y1)`` in level-0 px, as the delta-rs writer's tasks report them), or else read back from the
    committed tiles table (five numeric columns, no pixels; :func:`slidelake.tables.read_columns`),
    are drawn, in mask px, over the thumbnail and mask outline, on the driver with one thread per
    core (a picture takes tens of ms). ``tiles_path`` and ``rects`` None draw the outline only.
    """
    todo = {sid: m for sid, m in masks.items() if m.get("qc_path") and m.get("thumbnail_path")}
    if not todo:
        return
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from slidelake.masks import read_overlay

    level0: dict[str, np.ndarray] = dict(rects or {})
    if rects is None and tiles_path is not None:
        import pyarrow.compute as pc

        t = read_columns(spark, tiles_path, writer, ["slide_id", "run_id", "level0_x", "level0_y", "valid_width",
                                                     "valid_height", "downsample"], list(todo))
        if t.num_columns:
            t = t.filter(pc.equal(t.column("run_id"), run_id))
            sids = t.column("slide_id").to_numpy(zero_copy_only=False)
            order = np.argsort(sids, kind="stable")  # one pass over the rows, not one per slide
            keys, starts = np.unique(sids[order], return_index=True)
            level0 = dict(zip(keys.tolist(), np.split(level0_rects(t)[order], starts[1:])))

    def draw(sid: str) -> None:
        m = todo[sid]
        boxes = np.asarray(level0.get(sid, np.zeros((0, 4))), dtype=float)
        boxes = boxes / np.array([m["mask_downsample_x"], m["mask_downsample_y"]] * 2, dtype=float)
        labels, _ = read_overlay(m["mask_path"])
        rgb = np.asarray(Image.open(m["thumbnail_path"]).convert("RGB"))
        Image.fromarray(qc_picture(rgb, labels, boxes)).save(m["qc_path"], compress_level=1)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(draw, list(todo)))


def _draw_qc_after_failure(masks: dict[str, dict]) -> None:
    """The QC pictures of ``masks`` (made by a tiling run that then failed), outline only; an
    error here is logged, not raised over the run's own error."""
    try:
        draw_qc(None, None, "", masks, None)
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        import logging

        logging.getLogger(__name__).warning("QC pictures of the failed run not drawn: %s", exc)


# -------------------------------------------------------------------------------------- tile

def _check_config_mix(spark, paths, writer, chash, slide_ids, replace_table) -> None:
    if replace_table:
        return
    t = read_columns(spark, paths["tiles"], writer, ["slide_id", "config_hash"])
    if t.num_columns == 0 or t.num_rows == 0:
        return
    pdf = t.to_pandas()
    others = sorted(set(pdf.loc[(pdf["config_hash"] != chash) & ~pdf["slide_id"].isin(list(slide_ids)),
                                "config_hash"].dropna()))[:5]
    if others:
        hashes = ", ".join(others)
        raise ConfigMismatchError(
            f"the tiles table {paths['tiles']} holds tiles of other slides made with a different "
            f"tiling config (config_hash {hashes}; this run: {chash}). Write to another table "
            "(--tiles-table NAME / tables.tiles_table) or replace the whole table (--replace-table)"
        )


def tile_slides(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord, slides: list[dict],
                replace_table: bool = False, progress: bool = False, profile: bool = False,
                force: bool = False) -> None:
    """Tiling stages on ``slides`` rows (dicts of the ``slides`` table schema; ``ok`` rows are
    tiled, once per ``slide_id``): resolve, skip slides already tiled, masks, then per batch of
    ``tables.slides_per_commit`` slides: grid, overlap, filter before decode, repartition,
    decode, pixel filter, write ``<lake>/<tiles_table>`` partitioned by ``slide_id`` (one
    commit), ``tile_errors`` and ``run_slides``; then the QC pictures.

    **Incremental**: a slide whose content (``slide_id``, a content hash) was already tiled into
    this tiles table with the same tiling config (``config_hash``), as recorded in
    ``<lake>/run_slides``, is skipped unless ``force``. Each batch's tiles are committed before
    its ``run_slides`` rows, so a run killed half way is finished by running it again: committed
    batches are skipped, a batch whose commit was lost is redone, and its partitions are
    replaced, never duplicated. A slide with zero kept tiles ends with none. Slides that fail
    resolution (or, with masks enabled, whose mask fails) are recorded in ``rec.slide_errors``
    and leave their old tiles untouched.

    ``progress`` shows live tile counts on the driver (:class:`~slidelake.progress.TileProgress`);
    ``profile`` records seconds and tiles per stage, summed over the Python workers, into
    ``rec.profile`` (the ``runs.profile`` column).

    Raises:
        ConfigMismatchError: the table holds other slides' tiles of another config and
            ``replace_table`` is false.
    """
    paths = lake_paths(cfg)
    writer = rec.delta_writer or "delta-rs"
    chash = config_hash(cfg)
    grid_cfg = cfg.grid

    with _stage(rec, "resolve"):
        # a few rows per slide: deduplicate and resolve on the driver, no Spark job
        selected = select_rows_for_tiling(slides)
        resolved_rows = [{**r, **resolve_row(r, cfg.resolution)} for r in selected]
    good = [r for r in resolved_rows if r["resolution_error"] is None]
    rec.slide_errors += [
        {"slide_id": r["slide_id"], "path": r["path"], "stage": "resolution", "error": r["resolution_error"]}
        for r in resolved_rows if r["resolution_error"] is not None
    ]
    done = set() if force or replace_table else tiled_before(spark, paths, writer, chash, cfg.tables.tiles_table)
    rec.counts["slides_skipped"] = sum(1 for r in good if r["slide_id"] in done)
    good = [r for r in good if r["slide_id"] not in done]
    prof_acc = spark.sparkContext.accumulator({}, SumLog()) if profile else None
    on_profile = (lambda d: prof_acc.add(d)) if prof_acc is not None else None
    step = cfg.tables.slides_per_commit
    masks: dict[str, dict] = {}
    if cfg.masks.enabled and good:
        masks = mask_slides(spark, cfg, rec, good, on_profile, qc=False)  # QC drawn with the tiles at the end
        good = [r for r in good if r["slide_id"] in masks]
    try:
        generated = {r["slide_id"]: _grid_tiles(r, grid_cfg) for r in good}
        total = sum(generated.values())
        _check_config_mix(spark, paths, writer, chash, [r["slide_id"] for r in good], replace_table)
        # tiles of content no longer in the slides table (a file rewritten with other content since
        # it was tiled) are removed with the first commit
        current = {r["slide_id"] for r in read_rows(spark, paths["slides"], writer, SLIDES_SCHEMA)} | {r["slide_id"] for r in slides}
        stale = sorted(partition_values(spark, paths["tiles"], writer) - current)

        decoded_acc = spark.sparkContext.accumulator({}, CountLog())  # live progress only

        counts: list[dict] = []
        written_total = 0
        rects: dict[str, np.ndarray] | None = {}  # this run's tiles for the QC pictures (None: read back)
        batches = [good[i:i + step] for i in range(0, len(good), step)] or ([[]] if replace_table or stale else [])
        with TileProgress(spark, total, lambda: sum(decoded_acc.value.values()), enabled=progress):
            for i, batch in enumerate(batches):
                with _stage(rec, "overlap+decode+write"):
                    # tasks sized by the tiles expected to be decoded, not by the grid (masks drop most)
                    expected = sum(generated[r["slide_id"]] * (_tissue_share(masks.get(r["slide_id"]))
                                                               if cfg.filter.min_tissue_fraction is not None else 1.0)
                                   for r in batch)
                    overlay = {r["slide_id"]: masks[r["slide_id"]]["mask_path"] if r["slide_id"] in masks else None
                               for r in batch}
                    planned = plan_tiles(spark, cfg, batch, overlay, on_profile)
                    wrote = _tile_batch(spark, cfg, rec, batch, planned, expected,
                                        replace_table and i == 0, stale if i == 0 else [], decoded_acc.add, on_profile)
                res = wrote.result
                rec.table_versions[cfg.tables.tiles_table] = res.version if res.version is not None else -1
                batch_counts = _slide_counts(rec, batch, generated, wrote)
                with _stage(rec, "write"):
                    _write_tile_errors(spark, paths["tile_errors"], writer, rec, chash, batch, wrote.failures,
                                       cfg.tables.path_root)
                    _write_run_slides(spark, paths["run_slides"], writer, rec, chash, cfg.tables.tiles_table,
                                      batch, batch_counts, rec.table_versions[cfg.tables.tiles_table],
                                      replace_table and i == 0, cfg.tables.path_root)
                counts += batch_counts
                written_total += res.rows
                rects = None if rects is None or wrote.rects is None else {**rects, **wrote.rects}
    except BaseException:
        # the QC pictures of this run's new masks are drawn with its tiles below; a failed run
        # still leaves each masks row's qc_path with its picture (mask outline, no tiles)
        _draw_qc_after_failure({sid: m for sid, m in masks.items() if m.get("run_id") == rec.run_id})
        raise
    with _stage(rec, "qc"):
        draw_qc(spark, paths["tiles"], writer, {r["slide_id"]: masks[r["slide_id"]] for r in good
                                                if r["slide_id"] in masks}, rec.run_id, rects)
    rec.slide_counts = counts
    if prof_acc is not None:
        rec.profile = {**(rec.profile or {}), **{k: float(v) for k, v in prof_acc.value.items()},
                       **{f"wall.{k}": v for k, v in rec.stage_seconds.items()},
                       "tiles.generated": float(total), "tiles.written": float(written_total)}
    rec.counts.update(
        slides_tiled=len(good),
        tiles_generated=total,
        tiles_written=written_total,
        **{k: sum(c[k] for c in counts) for k in ("tiles_skipped", "tiles_decoded", "tiles_failed", "tiles_filtered")},
    )


def plan_tiles(spark: SparkSession, cfg: PipelineConfig, batch: list[dict], overlay: dict[str, str | None],
               on_profile=None) -> DataFrame:
    """Steps 1-3 of a batch's plan: the grid rows of ``batch`` (resolved slide rows), their
    overlap with each slide's overlay (``overlay``: ``slide_id`` -> overlay path or None) and
    annotations, the filter before decode, and the slides' own columns joined back (lazy: no
    Spark job runs; the rows are in the plan).

    Returns:
        A DataFrame of kept tile rows with the decode inputs and every non-pixel tiles column,
        ``tile_id`` included (a hash of slide, config and position, so it does not depend on
        where the row is computed).
    """
    grid_cfg, fcfg, ann = cfg.grid, cfg.filter, cfg.annotations
    schema = resolved_schema(SLIDES_SCHEMA)
    # per-slide inputs of the overlap stage, decided on the driver
    notes = {r["slide_id"]: annotation_path(r["path"], r["attributes"], ann.column, ann.sidecar_suffix)
             if ann.enabled else None for r in batch}
    sides = T.StructType([T.StructField("overlay_path", T.StringType()),
                          T.StructField("annotations_path", T.StringType())])
    # held in the plan (no Spark job to broadcast it below, no Python worker to read it)
    resolved = local_frame(spark, [
        (*(r[f] for f in schema.fieldNames()), overlay[r["slide_id"]], notes[r["slide_id"]]) for r in batch
    ], T.StructType(schema.fields + sides.fields))
    base = resolved.select(
        "slide_id", "path", "fingerprint", "attributes", "level", "level_downsample", "downsample",
        F.col("tile_mpp_x").alias("mpp_x"), F.col("tile_mpp_y").alias("mpp_y"),
        F.col("tile_mpp_source").alias("mpp_source"), "extent_x", "extent_y",
        F.col("width").alias("slide_width"), F.col("height").alias("slide_height"),
        "overlay_path", "annotations_path",
    )
    # size of one tile's region at the read level: once per slide, before the explode
    ex, ey = grid_cfg.tile_extent
    scale = F.col("downsample") / F.col("level_downsample")
    base = base.withColumns({
        "read_width": F.greatest(F.lit(1), F.round(F.lit(ex) * scale)).cast("int"),
        "read_height": F.greatest(F.lit(1), F.round(F.lit(ey) * scale)).cast("int"),
        **grid_constants(grid_cfg.tile_extent, grid_cfg.stride_xy),
    })
    # 1. grid (metadata only): per-tile columns only, the batch's grid rows split in bands over
    # the cores; the slide's own columns are joined back to the kept tiles (3.)
    per_band = band_tiles(sum(_grid_tiles(r, grid_cfg) for r in batch), spark.sparkContext.defaultParallelism,
                          GRID_TILES_PER_TASK, GRID_TILES_PER_TASK_MIN)
    tiles = banded_grid(spark, batch, grid_cfg.tile_extent, grid_cfg.stride_xy, grid_cfg.last, grid_cfg.roi, per_band)
    # 2. overlap with the mask and annotations, per slide, still metadata only, and
    # 3. the filter before decode, in the same task: only tiles that pass are ever decoded
    # (tiles whose overlap failed go on, undecoded, so the write stage records them exactly)
    inputs = {r["slide_id"]: SlideInputs(r["width"], r["height"], r["downsample"], overlay[r["slide_id"]],
                                         notes[r["slide_id"]]) for r in batch}
    min_tissue = fcfg.min_tissue_fraction if cfg.masks.enabled else None
    tiles = overlap_tiles(tiles, inputs, grid_cfg.tile_roi, ann.label_min_fraction, min_tissue,
                          fcfg.min_annotated_fraction, on_profile)
    return tiles.join(F.broadcast(base), "slide_id").withColumn(
        "tile_id", F.xxhash64("slide_id", F.lit(config_hash(cfg)), "tile_x", "tile_y"))


def _tile_batch(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord, batch: list[dict], planned: DataFrame,
                expected: float, replace_table: bool, drop: list[str], on_decoded, on_profile) -> TileWrite:
    """Repartition, decode, filter and write one batch of resolved slide rows (``planned``: its
    :func:`plan_tiles`) as one commit replacing their partitions and removing the ``drop``
    partitions (the whole table when ``replace_table``). ``expected``: tiles expected to be
    decoded (sizes the decode tasks, :func:`slidelake.decode.partition_count`)."""
    paths = lake_paths(cfg)
    writer = rec.delta_writer or "delta-rs"
    # 4. repartition
    tiles = repartition_tiles(planned, cfg.partition, expected)
    # 5. decode, 6. pixel filter, 7. write with lineage columns: in the Python workers
    lineage = Lineage(rec.run_id, config_hash(cfg), __version__, rec.started_at, cfg.tables.path_root)
    return write_tiles(spark, tiles, paths["tiles"], writer, cfg.decode, cfg.filter, lineage,
                       None if replace_table else [r["slide_id"] for r in batch] + list(drop), cfg.tables.tile_compression,
                       on_decoded, on_profile)


def _grid_tiles(row: dict, grid_cfg) -> int:
    """Grid tiles of one resolved slide row (:func:`slidelake.grid.grid_size` with ``grid_cfg``)."""
    return grid_size(row["extent_x"], row["extent_y"], row["downsample"], grid_cfg.tile_extent, grid_cfg.stride_xy,
                     grid_cfg.last, grid_cfg.roi)


def _tissue_share(mask: dict | None) -> float:
    """Share of a slide's tiles expected to pass the mask: its tissue fraction (1.0 without a
    computed mask; at least 1 %, so a mask that found almost nothing still gets a task)."""
    if mask is None or mask.get("tissue_fraction") is None:
        return 1.0
    return min(1.0, max(0.01, float(mask["tissue_fraction"])))


def _slide_counts(rec: RunRecord, batch: list[dict], generated: dict[str, int], wrote: TileWrite) -> list[dict]:
    """Per-slide counts of a committed batch (``runs.slide_counts``); failed tiles sampled into
    ``rec.slide_errors``."""
    counts = []
    for r in batch:
        sid = r["slide_id"]
        gen, written = generated[sid], wrote.result.rows_by_partition.get(sid, 0)
        dec = min(max(wrote.decoded.get(sid, 0), written), gen)
        failed = min(wrote.failed.get(sid, 0), gen - written)
        # tiles whose overlap failed were neither skipped by the mask nor decoded
        no_overlap = min(sum(1 for f in wrote.failures.get(sid, []) if f.get("stage") == "overlap"), gen - dec)
        counts.append({
            "slide_id": sid, "path": r["path"], "level": r["level"], "mpp_x": r["tile_mpp_x"],
            "tiles_generated": gen, "tiles_skipped": gen - dec - no_overlap, "tiles_decoded": dec,
            "tiles_failed": failed, "tiles_filtered": max(0, dec - written - (failed - no_overlap)),
            "tiles_written": written,
        })
        for s in wrote.failures.get(sid, [])[:MAX_ERROR_SAMPLES]:
            rec.slide_errors.append({
                "slide_id": sid, "path": r["path"], "stage": s.get("stage", "decode"),
                "error": f"tile ({s['tile_x']}, {s['tile_y']}): {s['error']}",
            })
    return counts


def tiled_before(spark: SparkSession, paths: dict[str, str], writer: str, chash: str, tiles_table: str) -> set[str]:
    """``slide_id`` of slides whose tiles with tiling config ``chash`` are committed in
    ``tiles_table`` by their latest commit, from ``<lake>/run_slides`` (rows since the table
    was last replaced whole; none when the tiles table does not exist)."""
    from slidelake.tables import table_exists

    if "://" not in paths["tiles"] and not table_exists(paths["tiles"]):
        return set()
    rows = [r for r in read_rows(spark, paths["run_slides"], writer, RUN_SLIDES_SCHEMA) if r["tiles_table"] == tiles_table]
    replaced = max((r["run_id"] for r in rows if r["replaced_table"]), default="")
    latest: dict[str, dict] = {}  # the last commit of each slide decides (a later config may have replaced it)
    for r in sorted(rows, key=lambda r: r["run_id"]):
        if r["run_id"] >= replaced:
            latest[r["slide_id"]] = r
    return {sid for sid, r in latest.items() if r["config_hash"] == chash}


def _write_run_slides(spark: SparkSession, path: str, writer: str, rec: RunRecord, chash: str, tiles_table: str,
                      batch: list[dict], counts: list[dict], version: int, replaced_table: bool,
                      path_root: str | None = None) -> None:
    """Append one ``run_slides`` row per slide of a committed batch (after its tiles commit)."""
    now = utcnow()
    by_id = {c["slide_id"]: c for c in counts}
    rows = [{"run_id": rec.run_id, "slide_id": r["slide_id"], "path": r["path"], "fingerprint": r["fingerprint"],
             "config_hash": chash, "tiles_table": tiles_table, "tiles_version": version,
             "replaced_table": replaced_table, "tiles_generated": by_id[r["slide_id"]]["tiles_generated"],
             "tiles_written": by_id[r["slide_id"]]["tiles_written"], "tiles_failed": by_id[r["slide_id"]]["tiles_failed"],
             "created_at": now} for r in batch]
    if rows or replaced_table:
        write_rows(spark, rows, RUN_SLIDES_SCHEMA, path, writer, mode="append", description="write run_slides",
                   path_root=path_root)


# ---------------------------------------------------------------------------------- the jobs

def _run(spark: SparkSession, cfg: PipelineConfig, job: str, body) -> RunRecord:
    writer = resolve_writer(spark, cfg.tables.writer)
    rec = _new_record(spark, cfg, job, writer)
    paths = lake_paths(cfg)
    try:
        body(rec)
        rec.status = "succeeded"
    except BaseException as exc:
        rec.status = "failed"
        rec.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        spark.sparkContext.setJobDescription(None)
        _write_run(spark, rec, paths, writer, cfg.tables.path_root)
        if cfg.tables.catalog_database and writer == "spark" and rec.status == "succeeded":
            register_tables(spark, cfg.tables.catalog_database,
                            {"slides": paths["slides"], "masks": paths["masks"], cfg.tables.tiles_table: paths["tiles"],
                             "tile_errors": paths["tile_errors"], "runs": paths["runs"]})
    return rec


def run_discover(spark: SparkSession, cfg: PipelineConfig) -> RunRecord:
    """The discovery job: probe ``cfg.inputs`` into ``<lake>/slides``; returns the run record."""
    return _run(spark, cfg, "discover", lambda rec: discover_slides(spark, cfg, rec))


def _listed_slides(spark: SparkSession, cfg: PipelineConfig, writer: str) -> list[dict]:
    """Rows of ``<lake>/slides`` (dicts), only those of the listed inputs when ``cfg.inputs`` is set."""
    slides = read_rows(spark, lake_paths(cfg)["slides"], writer, SLIDES_SCHEMA, cfg.tables.path_root)
    if cfg.inputs:
        listed = set(list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive,
                                 cfg.discovery.exclude)["path"])
        slides = [r for r in slides if r["path"] in listed]
    return slides


def run_masks(spark: SparkSession, cfg: PipelineConfig) -> RunRecord:
    """The masks job on slides already in ``<lake>/slides`` (only the listed inputs when
    ``cfg.inputs`` is set): compute missing or outdated tissue masks into ``<lake>/masks``."""
    def body(rec: RunRecord) -> None:
        rows = select_rows_for_tiling(_listed_slides(spark, cfg, rec.delta_writer or "delta-rs"))
        mask_slides(spark, cfg, rec, rows)

    return _run(spark, cfg, "masks", body)


def run_tile(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False, progress: bool = False,
             profile: bool = False, force: bool = False) -> RunRecord:
    """The tiling job on slides already in ``<lake>/slides`` (masks included when enabled;
    existing masks are reused).

    With ``cfg.inputs`` set, only slides whose path is among the listed inputs are tiled;
    otherwise every ``ok`` slide of the table.
    """
    def body(rec: RunRecord) -> None:
        slides = _listed_slides(spark, cfg, rec.delta_writer or "delta-rs")
        tile_slides(spark, cfg, rec, slides, replace_table, progress, profile, force)

    return _run(spark, cfg, "tile", body)


def run_all(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False, progress: bool = False,
            profile: bool = False, force: bool = False) -> RunRecord:
    """Discover ``cfg.inputs``, then make masks (when enabled) and tile the slides found, as one run.

    Incremental: unchanged files are not re-hashed and slides already tiled with this config
    are skipped (:func:`tile_slides`); ``force`` re-probes and re-tiles every listed slide."""
    def body(rec: RunRecord) -> None:
        found = discover_slides(spark, cfg, rec, force)
        tile_slides(spark, cfg, rec, found, replace_table, progress, profile, force)

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
    if c.get("masks_computed") is not None:
        parts.append(f"masks: {c['masks_computed']} computed, {c['masks_reused']} reused, {c['masks_failed']} failed")
    if "tiles_generated" in c:
        parts.append(
            f"tiles: {c['tiles_generated']} generated, {c['tiles_skipped']} skipped before decode, "
            f"{c['tiles_decoded']} decoded, {c['tiles_filtered']} filtered, {c['tiles_failed']} failed, "
            f"{c['tiles_written']} written from {c['slides_tiled']} slide(s)"
        )
    for e in rec.slide_errors[:10]:
        parts.append(f"  ! {e['stage']}: {e['path']}: {e['error']}")
    if len(rec.slide_errors) > 10:
        parts.append(f"  ... {len(rec.slide_errors) - 10} more errors in the runs table")
    return "\n".join(parts)


__all__ = ["run_discover", "run_masks", "run_tile", "run_all", "discover_slides", "mask_slides", "tile_slides",
           "plan_tiles", "draw_qc", "lake_paths", "lake_root", "summary", "ConfigMismatchError", "TILES_COLUMNS"]
