"""The slidelake pipeline, top to bottom:

discover -> resolve resolution -> expand grid -> repartition -> decode -> filter -> write,
with a ``runs`` row recording what happened (also when the run fails).

:func:`run_discover` and :func:`run_tile` are the two jobs; :func:`run_all` does both.
Each returns the :class:`~slidelake.lineage.RunRecord` it wrote to ``<lake>/runs``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from slidelake import __version__
from slidelake.config import PipelineConfig, config_hash
from slidelake.decode import decode_tiles, repartition_tiles
from slidelake.filtering import filter_tiles
from slidelake.grid import expand_grid, grid_size
from slidelake.lineage import RUNS_SCHEMA, FailureLog, RunRecord, versions
from slidelake.resolution import resolve_slides
from slidelake.slides import SLIDES_SCHEMA, discover, list_inputs, select_for_tiling
from slidelake.tables import read_table, register_tables, resolve_writer, write_table

# column order of the tiles table
TILES_COLUMNS = (
    "slide_id", "tile_id", "path", "fingerprint", "level", "level_downsample", "downsample",
    "mpp_x", "mpp_y", "mpp_source", "tile_x", "tile_y", "tile_col", "tile_row", "level0_x",
    "level0_y", "tile_extent_x", "tile_extent_y", "stride_x", "stride_y", "valid_width",
    "valid_height", "tile", "tile_format", "tile_width", "tile_height", "tile_mean", "tile_std",
    "background_fraction", "attributes", "run_id", "config_hash", "slidelake_version",
    "created_at",
)


class ConfigMismatchError(RuntimeError):
    """The tiles table holds tiles of other slides made with a different tiling config."""


def lake_paths(cfg: PipelineConfig) -> dict[str, str]:
    """Absolute (or URI) paths of the lake's tables: ``slides``, ``tiles``, ``runs``."""
    root = cfg.lake if "://" in cfg.lake else os.path.abspath(cfg.lake)
    return {"slides": f"{root}/slides", "tiles": f"{root}/{cfg.tables.tiles_table}", "runs": f"{root}/runs"}


@contextmanager
def _stage(rec: RunRecord, name: str) -> Iterator[None]:
    t = time.perf_counter()
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
    df = spark.createDataFrame([rec.row()], schema=RUNS_SCHEMA).coalesce(1)
    write_table(spark, df, paths["runs"], writer, mode="append", description="write runs")


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
        listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive)
        rows = [r.asDict() for r in discover(spark, listed, rec.run_id).collect()] if len(listed) else []
        assumed = cfg.resolution.assumed_mpp
        for r in rows:
            if assumed is not None and r["status"] == "ok" and r["mpp_x"] is None:
                r.update(mpp_x=float(assumed), mpp_y=float(assumed), mpp_source="assumed")
        found = spark.createDataFrame(rows, schema=SLIDES_SCHEMA)
    with _stage(rec, "write"):
        existing = read_table(spark, paths["slides"], writer, SLIDES_SCHEMA)
        kept = existing.join(found.select("path"), on="path", how="left_anti").select(*SLIDES_SCHEMA.fieldNames())
        res = write_table(spark, kept.unionByName(found).coalesce(1), paths["slides"], writer, mode="overwrite",
                          description="write slides")
        rec.table_versions["slides"] = res.version if res.version is not None else -1
    n_ok = sum(1 for r in rows if r["status"] == "ok")
    rec.counts.update(slides_discovered=len(rows), slides_ok=n_ok, slides_error=len(rows) - n_ok)
    rec.slide_errors += [
        {"slide_id": r["slide_id"], "path": r["path"], "stage": "discover", "error": r["error"]}
        for r in rows if r["status"] != "ok"
    ]
    return found


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
                replace_table: bool = False) -> None:
    """Tiling stages on ``slides`` rows (``slides`` table schema): resolve, grid, repartition,
    decode, filter, write ``<lake>/<tiles_table>`` partitioned by ``slide_id``.

    Each tiled slide's partition is replaced in one commit, so a rerun does not duplicate tiles
    and a slide with zero kept tiles ends with none. Slides that fail resolution are recorded in
    ``rec.slide_errors`` and leave their old tiles untouched.

    Raises:
        ConfigMismatchError: the table holds other slides' tiles of another config and
            ``replace_table`` is false.
    """
    paths = lake_paths(cfg)
    writer = rec.delta_writer or "delta-rs"
    chash = config_hash(cfg)
    grid_cfg = cfg.grid

    with _stage(rec, "resolve"):
        resolved_df = resolve_slides(select_for_tiling(slides), cfg.resolution)
        resolved_rows = resolved_df.collect()
    good = [r for r in resolved_rows if r["resolution_error"] is None]
    rec.slide_errors += [
        {"slide_id": r["slide_id"], "path": r["path"], "stage": "resolution", "error": r["resolution_error"]}
        for r in resolved_rows if r["resolution_error"] is not None
    ]
    generated = {
        r["slide_id"]: grid_size(r["extent_x"], r["extent_y"], r["downsample"], grid_cfg.tile_extent,
                                 grid_cfg.stride_xy, grid_cfg.last, grid_cfg.roi)
        for r in good
    }
    total = sum(generated.values())
    slide_ids = [r["slide_id"] for r in good]
    _check_config_mix(spark, paths, writer, chash, slide_ids, replace_table)

    failures = spark.sparkContext.accumulator({}, FailureLog())

    def on_failure(slide_id: str, info: dict) -> None:
        failures.add({slide_id: {"count": 1, "samples": [info]}})

    resolved = spark.createDataFrame(resolved_rows, schema=resolved_df.schema)
    resolved = resolved.where(F.col("resolution_error").isNull())
    base = resolved.select(
        "slide_id", "path", "fingerprint", "attributes", "level", "level_downsample", "downsample",
        F.col("tile_mpp_x").alias("mpp_x"), F.col("tile_mpp_y").alias("mpp_y"),
        F.col("tile_mpp_source").alias("mpp_source"), "extent_x", "extent_y",
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
    # 2. repartition, 3. decode, 4. filter
    tiles = repartition_tiles(tiles, cfg.partition, total)
    decoded = decode_tiles(tiles, cfg.decode, on_failure)
    kept = filter_tiles(decoded, cfg.filter)
    # 5. lineage columns, write
    out = (
        kept.withColumn("tile_id", F.xxhash64("slide_id", F.lit(chash), "tile_x", "tile_y"))
        .withColumn("run_id", F.lit(rec.run_id))
        .withColumn("config_hash", F.lit(chash))
        .withColumn("slidelake_version", F.lit(__version__))
        .withColumn("created_at", F.lit(rec.started_at).cast("timestamp"))
        .select(*TILES_COLUMNS)
    )
    with _stage(rec, "decode+write"):
        res = write_table(
            spark, out, paths["tiles"], writer, mode="overwrite", partition_by=["slide_id"],
            replace_partitions=None if replace_table else slide_ids, description="decode + write tiles",
        )
    rec.table_versions[cfg.tables.tiles_table] = res.version if res.version is not None else -1
    fails = failures.value
    counts = []
    for r in good:
        sid = r["slide_id"]
        gen, wrote = generated[sid], res.rows_by_partition.get(sid, 0)
        failed = min(fails.get(sid, {}).get("count", 0), gen - wrote)
        counts.append({
            "slide_id": sid, "path": r["path"], "level": r["level"], "mpp_x": r["tile_mpp_x"],
            "tiles_generated": gen, "tiles_failed": failed, "tiles_filtered": gen - wrote - failed,
            "tiles_written": wrote,
        })
        for s in fails.get(sid, {}).get("samples", []):
            rec.slide_errors.append({
                "slide_id": sid, "path": r["path"], "stage": "decode",
                "error": f"tile ({s['tile_x']}, {s['tile_y']}): {s['error']}",
            })
    rec.slide_counts = counts
    rec.counts.update(
        slides_tiled=len(good),
        tiles_generated=total,
        tiles_written=res.rows,
        tiles_failed=sum(c["tiles_failed"] for c in counts),
        tiles_filtered=sum(c["tiles_filtered"] for c in counts),
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
                            {"slides": paths["slides"], cfg.tables.tiles_table: paths["tiles"], "runs": paths["runs"]})
    return rec


def run_discover(spark: SparkSession, cfg: PipelineConfig) -> RunRecord:
    """The discovery job: probe ``cfg.inputs`` into ``<lake>/slides``; returns the run record."""
    return _run(spark, cfg, "discover", lambda rec: discover_slides(spark, cfg, rec))


def run_tile(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False) -> RunRecord:
    """The tiling job on slides already in ``<lake>/slides``.

    With ``cfg.inputs`` set, only slides whose path is among the listed inputs are tiled;
    otherwise every ``ok`` slide of the table.
    """
    def body(rec: RunRecord) -> None:
        paths = lake_paths(cfg)
        slides = read_table(spark, paths["slides"], rec.delta_writer or "delta-rs", SLIDES_SCHEMA)
        if cfg.inputs:
            listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive)
            slides = slides.where(F.col("path").isin(list(listed["path"])))
        tile_slides(spark, cfg, rec, slides, replace_table)

    return _run(spark, cfg, "tile", body)


def run_all(spark: SparkSession, cfg: PipelineConfig, replace_table: bool = False) -> RunRecord:
    """Discover ``cfg.inputs`` then tile the slides found, as one run."""
    def body(rec: RunRecord) -> None:
        found = discover_slides(spark, cfg, rec)
        tile_slides(spark, cfg, rec, found, replace_table)

    return _run(spark, cfg, "run", body)


def summary(rec: RunRecord) -> str:
    """A short human summary of a run record."""
    c = rec.counts
    parts = [f"run {rec.run_id} {rec.status}"]
    if "slides_discovered" in c:
        parts.append(f"slides: {c['slides_discovered']} found, {c['slides_ok']} ok, {c['slides_error']} error")
    if "tiles_generated" in c:
        parts.append(
            f"tiles: {c['tiles_generated']} generated, {c['tiles_filtered']} filtered, "
            f"{c['tiles_failed']} failed, {c['tiles_written']} written from {c['slides_tiled']} slide(s)"
        )
    for e in rec.slide_errors[:10]:
        parts.append(f"  ! {e['stage']}: {e['path']}: {e['error']}")
    if len(rec.slide_errors) > 10:
        parts.append(f"  ... {len(rec.slide_errors) - 10} more errors in the runs table")
    return "\n".join(parts)


__all__ = ["run_discover", "run_tile", "run_all", "discover_slides", "tile_slides", "lake_paths",
           "summary", "ConfigMismatchError", "TILES_COLUMNS"]
