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
from typing import Iterator

from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from slidelake import __version__
from slidelake.config import PipelineConfig, config_hash
from slidelake.decode import decode_tiles, repartition_tiles
from slidelake.filtering import filter_tiles
from slidelake.grid import expand_grid, grid_size
from slidelake.lineage import RUNS_SCHEMA, CountLog, FailureLog, RunRecord, SumLog, versions
from slidelake.masks import MASKS_SCHEMA, make_masks, params_hash, qc_picture
from slidelake.overlap import annotation_path, overlap_tiles
from slidelake.progress import TileProgress
from slidelake.resolution import resolve_row, resolved_schema
from slidelake.slides import SLIDES_SCHEMA, discover, list_inputs, select_rows_for_tiling
from slidelake.tables import read_rows, read_table, register_tables, resolve_writer, write_rows, write_table

# column order of the tiles table
TILES_COLUMNS = (
    "slide_id", "tile_id", "path", "fingerprint", "level", "level_downsample", "downsample",
    "mpp_x", "mpp_y", "mpp_source", "tile_x", "tile_y", "tile_col", "tile_row", "level0_x",
    "level0_y", "tile_extent_x", "tile_extent_y", "stride_x", "stride_y", "valid_width",
    "valid_height", "tile", "tile_format", "tile_width", "tile_height", "tile_mean", "tile_std",
    "background_fraction", "reader", "tissue_fraction", "overlay_fractions", "overlay_path", "class_fractions",
    "annotated_fraction", "label", "annotations_path", "attributes", "run_id", "config_hash",
    "slidelake_version", "created_at",
)


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
    """Absolute (or URI) paths of the lake's tables: ``slides``, ``masks``, ``tiles``, ``runs``."""
    root = lake_root(cfg)
    return {"slides": f"{root}/slides", "masks": f"{root}/masks",
            "tiles": f"{root}/{cfg.tables.tiles_table}", "runs": f"{root}/runs"}


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


def _write_run(spark: SparkSession, rec: RunRecord, paths: dict[str, str], writer: str) -> None:
    write_rows(spark, [rec.row()], RUNS_SCHEMA, paths["runs"], writer, mode="append", description="write runs")


# ---------------------------------------------------------------------------------- discover

def discover_slides(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord) -> DataFrame:
    """Discovery stage: list the inputs, probe every file, merge into ``<lake>/slides``.

    Rows of paths scanned again replace their previous rows (no duplicates); other rows are
    kept. A ``resolution.assumed_mpp`` fills mpp (``mpp_source='assumed'``) for readable slides
    that have none.

    Returns:
        The rows of this scan (a DataFrame held on the driver, one row per path).
    """
    paths = lake_paths(cfg)
    writer = rec.delta_writer or "delta-rs"
    with _stage(rec, "discover"):
        listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive,
                             cfg.discovery.exclude)
        rows = [r.asDict(recursive=True) for r in discover(spark, listed, rec.run_id).collect()] if len(listed) else []
        assumed = cfg.resolution.assumed_mpp
        for r in rows:
            if assumed is not None and r["status"] == "ok" and r["mpp_x"] is None:
                r.update(mpp_x=float(assumed), mpp_y=float(assumed), mpp_source="assumed")
        found = spark.createDataFrame(rows, schema=SLIDES_SCHEMA)
    with _stage(rec, "write"):
        scanned = {r["path"] for r in rows}
        kept = [r for r in read_rows(spark, paths["slides"], writer, SLIDES_SCHEMA) if r["path"] not in scanned]
        res = write_rows(spark, kept + rows, SLIDES_SCHEMA, paths["slides"], writer, mode="overwrite",
                         description="write slides")
        rec.table_versions["slides"] = res.version if res.version is not None else -1
    n_ok = sum(1 for r in rows if r["status"] == "ok")
    rec.counts.update(slides_discovered=len(rows), slides_ok=n_ok, slides_error=len(rows) - n_ok)
    rec.slide_errors += [
        {"slide_id": r["slide_id"], "path": r["path"], "stage": "discover", "error": r["error"]}
        for r in rows if r["status"] != "ok"
    ]
    return found


# ------------------------------------------------------------------------------------- masks

def mask_slides(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord, slides: list[dict]) -> dict[str, dict]:
    """Masks stage: make sure each of ``slides`` (``slides`` rows as dicts) has a tissue mask.

    A mask whose slide content (``slide_id`` is the content hash) and algorithm settings
    (``params_hash``) are unchanged, and whose overlay file still exists, is reused; the others
    are computed (one Spark task per slide) and merged into ``<lake>/masks`` in one commit
    (rows of the same slide and ``params_hash`` are replaced). User overlays are re-read every
    run. Slides whose mask fails are recorded in ``rec.slide_errors`` (stage ``masks``).

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
        existing = read_rows(spark, paths["masks"], writer, MASKS_SCHEMA)
        ids = {r["slide_id"] for r in slides}
        prior = {m["slide_id"]: m for m in existing
                 if m["params_hash"] == phash and m["status"] == "ok" and m["source"] == "computed"
                 and m["slide_id"] in ids}
        reuse = {sid: m for sid, m in prior.items()
                 if m["mask_path"] and os.path.isfile(m["mask_path"])}
        todo = [r for r in slides if r["slide_id"] not in reuse]
        made = [m.asDict(recursive=True) for m in make_masks(spark, todo, cfg.masks, overlay_root(cfg), rec.run_id).collect()] if todo else []
        if made:
            redone = {(m["slide_id"], m["params_hash"]) for m in made}
            kept = [m for m in existing if (m["slide_id"], m["params_hash"]) not in redone]
            res = write_rows(spark, kept + made, MASKS_SCHEMA, paths["masks"], writer, mode="overwrite",
                             description="write masks")
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


def draw_qc(spark: SparkSession, tiles_path: str, writer: str, masks: dict[str, dict], run_id: str) -> None:
    """Redraw each slide's QC picture (``masks.qc_path``) with the tiles this run kept.

    The tiles' in-slide rectangles are read back from the committed tiles table and drawn, in
    mask px, over the thumbnail and mask outline, one Spark task per slide.
    """
    if not masks:
        return
    import pandas as pd

    info = spark.createDataFrame(
        [(sid, m["mask_path"], m["thumbnail_path"], m["qc_path"], float(m["mask_downsample_x"]),
          float(m["mask_downsample_y"])) for sid, m in masks.items() if m.get("qc_path") and m.get("thumbnail_path")],
        "slide_id string, mask_path string, thumbnail_path string, qc_path string, mds_x double, mds_y double",
    )
    tiles = read_table(spark, tiles_path, writer).where(
        (F.col("run_id") == run_id) & F.col("slide_id").isin(list(masks))
    ).select(
        "slide_id", F.col("level0_x").cast("double").alias("x0"), F.col("level0_y").cast("double").alias("y0"),
        (F.col("level0_x") + F.col("valid_width") * F.col("downsample")).alias("x1"),
        (F.col("level0_y") + F.col("valid_height") * F.col("downsample")).alias("y1"),
    )
    joined = info.join(tiles, on="slide_id", how="left")

    def draw(pdf: pd.DataFrame) -> pd.DataFrame:
        import numpy as np
        from PIL import Image

        from slidelake.masks import read_overlay

        r = pdf.iloc[0]
        rects = pdf[["x0", "y0", "x1", "y1"]].dropna().to_numpy(float)
        rects = rects / np.array([r.mds_x, r.mds_y, r.mds_x, r.mds_y])
        labels, _ = read_overlay(r.mask_path)
        rgb = np.asarray(Image.open(r.thumbnail_path).convert("RGB"))
        Image.fromarray(qc_picture(rgb, labels, rects)).save(r.qc_path)
        return pd.DataFrame({"slide_id": [r.slide_id], "tiles_drawn": [len(rects)]})

    spark.sparkContext.setJobDescription("qc pictures")
    joined.groupBy("slide_id").applyInPandas(draw, "slide_id string, tiles_drawn long").collect()


# -------------------------------------------------------------------------------------- tile

def _check_config_mix(spark, paths, writer, chash, slide_ids, replace_table) -> None:
    try:
        existing = read_table(spark, paths["tiles"], writer)
    except FileNotFoundError:
        return
    if replace_table:
        return
    others = (
        existing.where((F.col("config_hash") != chash) & ~F.col("slide_id").isin(list(slide_ids)))
        .select("config_hash").distinct().limit(5).collect()
    )
    if others:
        hashes = ", ".join(r[0] for r in others)
        raise ConfigMismatchError(
            f"the tiles table {paths['tiles']} holds tiles of other slides made with a different "
            f"tiling config (config_hash {hashes}; this run: {chash}). Write to another table "
            "(--tiles-table NAME / tables.tiles_table) or replace the whole table (--replace-table)"
        )


def tile_slides(spark: SparkSession, cfg: PipelineConfig, rec: RunRecord, slides: DataFrame,
                replace_table: bool = False, progress: bool = False, profile: bool = False) -> None:
    """Tiling stages on ``slides`` rows (``slides`` table schema): masks, resolve, grid,
    overlap, filter before decode, repartition, decode, pixel filter, write
    ``<lake>/<tiles_table>`` partitioned by ``slide_id``, then the QC pictures.

    Each tiled slide's partition is replaced in one commit, so a rerun does not duplicate tiles
    and a slide with zero kept tiles ends with none. Slides that fail resolution (or, with
    masks enabled, whose mask fails) are recorded in ``rec.slide_errors`` and leave their old
    tiles untouched.

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
    grid_cfg, fcfg = cfg.grid, cfg.filter

    with _stage(rec, "resolve"):
        # a few rows per slide: deduplicate and resolve on the driver, no Spark job
        schema = resolved_schema(slides.schema)
        selected = _rows_to_tile(slides)
        resolved_rows = [Row(**{**r, **resolve_row(r, cfg.resolution)}) for r in selected]
    good = [r for r in resolved_rows if r["resolution_error"] is None]
    rec.slide_errors += [
        {"slide_id": r["slide_id"], "path": r["path"], "stage": "resolution", "error": r["resolution_error"]}
        for r in resolved_rows if r["resolution_error"] is not None
    ]
    masks: dict[str, dict] = {}
    if cfg.masks.enabled and good:
        masks = mask_slides(spark, cfg, rec, [r.asDict() for r in good])
        good = [r for r in good if r["slide_id"] in masks]
    generated = {
        r["slide_id"]: grid_size(r["extent_x"], r["extent_y"], r["downsample"], grid_cfg.tile_extent,
                                 grid_cfg.stride_xy, grid_cfg.last, grid_cfg.roi)
        for r in good
    }
    total = sum(generated.values())
    slide_ids = [r["slide_id"] for r in good]
    _check_config_mix(spark, paths, writer, chash, slide_ids, replace_table)

    failures = spark.sparkContext.accumulator({}, FailureLog())
    decoded_acc = spark.sparkContext.accumulator({}, CountLog())

    def on_failure(slide_id: str, info: dict) -> None:
        failures.add({slide_id: {"count": 1, "samples": [info]}})

    def on_decoded(counts: dict) -> None:
        decoded_acc.add(counts)

    prof_acc = spark.sparkContext.accumulator({}, SumLog()) if profile else None
    on_profile = (lambda d: prof_acc.add(d)) if prof_acc is not None else None

    # per-slide inputs of the overlap stage, decided on the driver
    ann = cfg.annotations
    side = {
        r["slide_id"]: (
            masks[r["slide_id"]]["mask_path"] if r["slide_id"] in masks else None,
            annotation_path(r["path"], r["attributes"], ann.column, ann.sidecar_suffix) if ann.enabled else None,
        )
        for r in good
    }
    resolved = spark.createDataFrame([tuple(r[f] for f in schema.fieldNames()) for r in resolved_rows
                                      if r["slide_id"] in generated], schema=schema)
    resolved = resolved.join(
        spark.createDataFrame([(k, v[0], v[1]) for k, v in side.items()] or [("", None, None)],
                              "slide_id string, overlay_path string, annotations_path string"),
        on="slide_id", how="inner",
    )
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
    base = (
        base.withColumn("read_width", F.greatest(F.lit(1), F.round(F.lit(ex) * scale)).cast("int"))
        .withColumn("read_height", F.greatest(F.lit(1), F.round(F.lit(ey) * scale)).cast("int"))
    )
    # 1. grid (metadata only)
    tiles = expand_grid(base, grid_cfg.tile_extent, grid_cfg.stride_xy, grid_cfg.last, grid_cfg.roi)
    # 2. overlap with the mask and annotations, per slide, still metadata only
    tiles = overlap_tiles(tiles, grid_cfg.tile_roi, ann.label_min_fraction, on_failure, on_profile)
    # 3. filter before decode: only tiles that pass are ever decoded
    keep = F.col("overlap_error").isNull()
    if cfg.masks.enabled and fcfg.min_tissue_fraction is not None:
        keep = keep & (F.col("tissue_fraction") >= F.lit(fcfg.min_tissue_fraction))
    if fcfg.min_annotated_fraction is not None:
        keep = keep & (F.coalesce(F.col("annotated_fraction"), F.lit(0.0)) >= F.lit(fcfg.min_annotated_fraction))
    tiles = tiles.where(keep).drop("overlap_error")
    # 4. repartition, 5. decode, 6. pixel filter
    tiles = repartition_tiles(tiles, cfg.partition, total)
    decoded = decode_tiles(tiles, cfg.decode, on_failure, on_decoded, on_profile)
    kept = filter_tiles(decoded, fcfg)
    # 7. lineage columns, write
    out = (
        kept.withColumn("tile_id", F.xxhash64("slide_id", F.lit(chash), "tile_x", "tile_y"))
        .withColumn("run_id", F.lit(rec.run_id))
        .withColumn("config_hash", F.lit(chash))
        .withColumn("slidelake_version", F.lit(__version__))
        .withColumn("created_at", F.lit(rec.started_at).cast("timestamp"))
        .select(*TILES_COLUMNS)
    )
    with _stage(rec, "overlap+decode+write"), TileProgress(spark, total, lambda: sum(decoded_acc.value.values()),
                                                            enabled=progress):
        res = write_table(
            spark, out, paths["tiles"], writer, mode="overwrite", partition_by=["slide_id"],
            replace_partitions=None if replace_table else slide_ids, description="overlap + decode + write tiles",
        )
    rec.table_versions[cfg.tables.tiles_table] = res.version if res.version is not None else -1
    with _stage(rec, "qc"):
        draw_qc(spark, paths["tiles"], writer, {sid: masks[sid] for sid in slide_ids if sid in masks}, rec.run_id)
    fails, decoded_n = failures.value, decoded_acc.value
    counts = []
    for r in good:
        sid = r["slide_id"]
        gen, wrote = generated[sid], res.rows_by_partition.get(sid, 0)
        dec = min(max(decoded_n.get(sid, 0), wrote), gen)
        failed = min(fails.get(sid, {}).get("count", 0), gen - wrote)
        counts.append({
            "slide_id": sid, "path": r["path"], "level": r["level"], "mpp_x": r["tile_mpp_x"],
            "tiles_generated": gen, "tiles_skipped": gen - dec, "tiles_decoded": dec,
            "tiles_failed": failed, "tiles_filtered": max(0, dec - wrote - failed), "tiles_written": wrote,
        })
        for s in fails.get(sid, {}).get("samples", []):
            rec.slide_errors.append({
                "slide_id": sid, "path": r["path"], "stage": s.get("stage", "decode"),
                "error": f"tile ({s['tile_x']}, {s['tile_y']}): {s['error']}",
            })
    rec.slide_counts = counts
    if prof_acc is not None:
        rec.profile = {**(rec.profile or {}), **{k: float(v) for k, v in prof_acc.value.items()},
                       **{f"wall.{k}": v for k, v in rec.stage_seconds.items()},
                       "tiles.generated": float(total), "tiles.written": float(res.rows)}
    rec.counts.update(
        slides_tiled=len(good),
        tiles_generated=total,
        tiles_written=res.rows,
        **{k: sum(c[k] for c in counts) for k in ("tiles_skipped", "tiles_decoded", "tiles_failed", "tiles_filtered")},
    )


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
        _write_run(spark, rec, paths, writer)
        if cfg.tables.catalog_database and writer == "spark" and rec.status == "succeeded":
            register_tables(spark, cfg.tables.catalog_database,
                            {"slides": paths["slides"], "masks": paths["masks"], cfg.tables.tiles_table: paths["tiles"],
                             "runs": paths["runs"]})
    return rec


def run_discover(spark: SparkSession, cfg: PipelineConfig) -> RunRecord:
    """The discovery job: probe ``cfg.inputs`` into ``<lake>/slides``; returns the run record."""
    return _run(spark, cfg, "discover", lambda rec: discover_slides(spark, cfg, rec))


def _rows_to_tile(slides: DataFrame) -> list[dict]:
    """The ``ok`` rows of ``slides``, deduplicated by content (:func:`select_rows_for_tiling`), as dicts."""
    return select_rows_for_tiling([r.asDict(recursive=True) for r in slides.where(F.col("status") == "ok").collect()])


def _listed_slides(spark: SparkSession, cfg: PipelineConfig, writer: str) -> DataFrame:
    slides = read_table(spark, lake_paths(cfg)["slides"], writer, SLIDES_SCHEMA)
    if cfg.inputs:
        listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive, cfg.discovery.exclude)
        slides = slides.where(F.col("path").isin(list(listed["path"])))
    return slides


def run_masks(spark: SparkSession, cfg: PipelineConfig) -> RunRecord:
    """The masks job on slides already in ``<lake>/slides`` (only the listed inputs when
    ``cfg.inputs`` is set): compute missing or outdated tissue masks into ``<lake>/masks``."""
    def body(rec: RunRecord) -> None:
        rows = _rows_to_tile(_listed_slides(spark, cfg, rec.delta_writer or "delta-rs"))
        mask_slides(spark, cfg, rec, rows)

    return _run(spark, cfg, "masks", body)


def run_tile(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False, progress: bool = False,
             profile: bool = False) -> RunRecord:
    """The tiling job on slides already in ``<lake>/slides`` (masks included when enabled;
    existing masks are reused).

    With ``cfg.inputs`` set, only slides whose path is among the listed inputs are tiled;
    otherwise every ``ok`` slide of the table.
    """
    def body(rec: RunRecord) -> None:
        paths = lake_paths(cfg)
        slides = read_table(spark, paths["slides"], rec.delta_writer or "delta-rs", SLIDES_SCHEMA)
        if cfg.inputs:
            listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive,
                             cfg.discovery.exclude)
            slides = slides.where(F.col("path").isin(list(listed["path"])))
        tile_slides(spark, cfg, rec, slides, replace_table)

    return _run(spark, cfg, "tile", body)


def run_all(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False, progress: bool = False,
            profile: bool = False) -> RunRecord:
    """Discover ``cfg.inputs``, then make masks (when enabled) and tile the slides found, as one run."""
    def body(rec: RunRecord) -> None:
        found = discover_slides(spark, cfg, rec)
        tile_slides(spark, cfg, rec, found, replace_table, progress, profile)

    return _run(spark, cfg, "run", body)


def summary(rec: RunRecord) -> str:
    """A short human summary of a run record."""
    c = rec.counts
    parts = [f"run {rec.run_id} {rec.status}"]
    if "slides_discovered" in c:
        parts.append(f"slides: {c['slides_discovered']} found, {c['slides_ok']} ok, {c['slides_error']} error")
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
           "draw_qc", "lake_paths", "lake_root", "summary", "ConfigMismatchError", "TILES_COLUMNS"]
