"""Decode, pixel filter and write stage: tile rows in, committed Delta tiles table out.

In the Python workers (a ``mapInArrow`` stage, :func:`make_file_sink`), per decode batch:
decode (:class:`slidelake.decode.TileDecoder`) -> pixel filter (:func:`pixel_filter`) -> write:
**the workers write the tiles' Parquet files themselves** with pyarrow, the rows staying Arrow
record batches from Spark to the file, one file per (task, slide) in the table's staging folder,
row groups of one decode batch. Only file names, row counts and per-slide decode outcomes (tiles
decoded, every failed tile with its coordinates and error) go back to the driver as task
results, so a task retried after an executor loss is counted once, and the files of failed or
superseded attempts are never committed. The driver then commits exactly those files in one
Delta commit (:meth:`slidelake.lake.Lake.commit_files`: delta-rs adds them to the log; Spark's
Delta writer reads them and writes them into the table). Tile bytes never pass through JVM
rows on their way from the decoder to a file.

Units: tile coordinates (``tile_x``, ``tile_y``) are px at the tile resolution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from slidelake.config import DecodeConfig, FilterConfig, StorageConfig
from slidelake.decode import DECODE_COLUMNS, DECODE_FIELDS, DecodedBatch, TileDecoder, tile_column
from slidelake.filtering import keep_mask
from slidelake.lineage import TILE_ERRORS_SCHEMA
from slidelake.memory import freeze_long_lived, reset_peak_rss
from slidelake.lake import Lake
from slidelake.storage import join, size as file_size
from slidelake.tables import WriteResult, discard_staging, to_stored
from slidelake.rows import TileFailure
from slidelake.tile_files import SlideFiles

# column order of the tiles table
TILES_COLUMNS = (
    "slide_id", "tile_id", "path", "fingerprint", "level", "level_downsample", "downsample",
    "mpp_x", "mpp_y", "mpp_source", "tile_x", "tile_y", "tile_col", "tile_row", "level0_x",
    "level0_y", "tile_extent_x", "tile_extent_y", "stride_x", "stride_y", "valid_width",
    "valid_height", "tile", "tile_format", "tile_width", "tile_height", "tile_mean", "tile_std",
    "background_fraction", "reader", "tissue_fraction", "overlay_fractions", "overlay_path", "class_fractions",
    "annotated_fraction", "label", "annotations_path", "attributes", "slide_label", "patient_id", "split",
    "run_id", "config_hash",
    "slidelake_version", "created_at",
)

LINEAGE_FIELDS = [
    T.StructField("run_id", T.StringType(), True),
    T.StructField("config_hash", T.StringType(), True),
    T.StructField("slidelake_version", T.StringType(), True),
    T.StructField("created_at", T.TimestampType(), True),
]

# a failed tile inside the task results: the per-tile columns of the tile_errors table
TILE_FAILURE = T.StructType([f for f in TILE_ERRORS_SCHEMA.fields if f.name in ("tile_x", "tile_y", "stage", "error")])

# one row per (task, slide) from the workers' file sink
TILE_FILES_SCHEMA = T.StructType([
    T.StructField("slide_id", T.StringType()),
    T.StructField("file", T.StringType()),  # relative to the staging folder; null when no tile was kept
    T.StructField("rows", T.LongType()),
    T.StructField("decoded", T.LongType()),
    T.StructField("failed", T.LongType()),
    T.StructField("failures", T.ArrayType(TILE_FAILURE)),
    # the file's tiles' rectangles in level-0 px, (x0, y0, x1, y1) little-endian int32 per tile
    # (16 bytes a tile): the QC picture is drawn from them without reading the files back
    T.StructField("rects", T.BinaryType()),
])


@dataclass(frozen=True)
class Lineage:
    """The run's lineage columns, identical on every tile it writes."""

    run_id: str
    config_hash: str
    slidelake_version: str
    created_at: datetime  # naive UTC
    path_root: str | None = None  # ``path`` is stored relative to it (tables.path_root)


@dataclass
class TileWrite:
    """What the decode + write stage did.

    Attributes:
        result: the tiles table commit (:class:`~slidelake.tables.WriteResult`).
        decoded: ``{slide_id: tiles whose decode was attempted}``.
        failed: ``{slide_id: tiles that failed to decode}``.
        failures: ``{slide_id: [{"tile_x", "tile_y", "stage", "error"}, ...]}``: every failed tile.
        rects: ``{slide_id: int32 (n, 4) array}`` of the written tiles' rectangles in level-0 px
            (:func:`slidelake.grid.level0_rects`), from the task results.
    """

    result: WriteResult
    decoded: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    failures: dict[str, list[TileFailure]] = field(default_factory=dict)
    rects: dict[str, np.ndarray] = field(default_factory=dict)


def tiles_schema(pre: T.StructType) -> T.StructType:
    """Spark schema of the tiles table, in :data:`TILES_COLUMNS` order, from the schema of the
    tile rows entering decode (``pre``, which carries ``tile_id``) plus the decode and lineage
    fields."""
    by_name = {f.name: f for f in [*pre.fields, *DECODE_FIELDS, *LINEAGE_FIELDS]}
    return T.StructType([by_name[c] for c in TILES_COLUMNS])


def _stored_path_array(paths: Any, root: str | None) -> Any:
    """An Arrow ``path`` column in stored form (relative to ``root``, see
    :func:`slidelake.tables.to_stored`), computed once per distinct path, not per tile;
    unchanged without ``root``."""
    if not root:
        return paths
    import pyarrow as pa
    import pyarrow.compute as pc

    distinct = pc.unique(paths)
    stored = pa.array([to_stored(p, root) for p in distinct.to_pylist()], pa.string())
    return stored.take(pc.index_in(paths, value_set=distinct))


def _arrow_failures(table: Any, rows: np.ndarray, column: str, stage: str, errors: list | None = None,
                    ) -> list[tuple[str, TileFailure]]:
    """``(slide_id, {"tile_x", "tile_y", "stage", "error"})`` for ``rows`` of an Arrow ``table``
    (the error text from ``errors[i]``, else from ``column``)."""
    if not len(rows):
        return []
    sub = table.take(rows)
    sids = sub.column("slide_id").to_pylist()
    xs, ys = sub.column("tile_x").to_pylist(), sub.column("tile_y").to_pylist()
    msgs = [errors[i] for i in rows] if errors is not None else sub.column(column).to_pylist()
    return [(str(sid), {"tile_x": int(x), "tile_y": int(y), "stage": stage, "error": str(e)})
            for sid, x, y, e in zip(sids, xs, ys, msgs)]


def pixel_filter(d: DecodedBatch, fcfg: FilterConfig) -> np.ndarray:
    """The pixel filter of a decoded batch: int64 indices of the tiles of ``d`` that decoded and
    pass ``filter.min_std`` / ``filter.max_background_fraction``
    (:func:`slidelake.filtering.keep_mask`)."""
    decoded = np.fromiter((t is not None and e is None for t, e in zip(d.tiles, d.errors)), bool, len(d.tiles))
    return np.flatnonzero(keep_mask(decoded, d.std, d.background_fraction, fcfg))


def _kept_table(chunk: Any, d: DecodedBatch, idx: np.ndarray, schema: Any, constants: dict[str, Any],
                path_root: str | None) -> Any:
    """The file rows (Arrow, ``schema``) of the kept tiles ``idx`` of a decoded ``chunk``: its
    metadata columns, the pixels and statistics of ``d``, and the run's ``constants``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = chunk.take(idx)
    new = {
        "path": _stored_path_array(kept.column("path"), path_root),
        "tile": tile_column([d.tiles[i] for i in idx]),
        "tile_width": pc.cast(kept.column("tile_extent_x"), pa.int32()),
        "tile_height": pc.cast(kept.column("tile_extent_y"), pa.int32()),
        "tile_mean": pa.array(d.mean[idx]), "tile_std": pa.array(d.std[idx]),
        "background_fraction": pa.array(d.background_fraction[idx]),
        "reader": pa.array([d.readers[i] for i in idx], pa.string()),
        **{k: pa.repeat(v, len(idx)) for k, v in constants.items()},
    }
    return pa.table([new[c] if c in new else kept.column(c) for c in schema.names], names=schema.names).cast(schema)


def _overlap_ok(batches: Iterator[Any], files: SlideFiles) -> Iterator[Any]:
    """Arrow tables of the rows whose overlap succeeded; tiles whose overlay or annotations
    could not be read are recorded as failed (stage ``overlap``) and never decoded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for rb in batches:
        table = pa.Table.from_batches([rb])
        if table.num_rows and "overlap_error" in table.column_names:
            bad = pc.is_valid(table.column("overlap_error"))
            files.fail(_arrow_failures(table, np.flatnonzero(bad.to_numpy(zero_copy_only=False)),
                                       "overlap_error", "overlap"))
            table = table.filter(pc.invert(bad))
        if table.num_rows:
            yield table


def make_file_sink(
    dcfg: DecodeConfig,
    fcfg: FilterConfig,
    lineage: Lineage,
    schema: T.StructType,
    staging: str,
    partition_col: str = "slide_id",
    tile_compression: str = "none",
    on_decoded: Callable[[dict[str, int]], None] | None = None,
    on_profile: Callable[[dict[str, float]], None] | None = None,
    direct_io: bool = True,
    storage: StorageConfig | None = None,
    remote_levels: dict[str, tuple[str | None, list[tuple[int, int]]]] | None = None,
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """Build the ``mapInArrow`` function that decodes, filters and writes a task's tiles:
    per decode batch (at most ``decode.batch_mb`` MiB of pixels, one Parquet row group),
    decode (:class:`~slidelake.decode.TileDecoder`) -> pixel filter (:func:`pixel_filter`) ->
    write (:class:`slidelake.tile_files.SlideFiles`).

    Works on Arrow record batches end to end: the tile rows' metadata columns go from Spark's
    Arrow batches to the Parquet file without a pandas round trip; only the decoder's inputs
    become NumPy arrays. Yields :data:`TILE_FILES_SCHEMA` record batches. ``on_decoded`` and
    ``on_profile`` (e.g. accumulators' ``add``) get ``{slide_id: tiles whose decode was
    attempted}`` and the ``--profile`` figures (:meth:`slidelake.decode.TileDecoder.profile`,
    plus ``write.s``, the seconds spent building and writing the Arrow tables) once per batch.
    ``staging`` is a folder or an ``s3://`` prefix (reached with ``storage``); slides on
    object storage are read as :class:`~slidelake.decode.TileDecoder` says (``remote_levels``).
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(T.StructType([f for f in schema.fields if f.name != partition_col]), timezone="UTC")
    result_schema = to_arrow_schema(TILE_FILES_SCHEMA, timezone="UTC")

    def sink(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.compute as pc

        freeze_long_lived()
        if on_profile is not None:
            reset_peak_rss()
        # raw tiles copied once, into the Arrow column
        decoder = TileDecoder(dcfg, raw_pixels=True, storage=storage, remote_levels=remote_levels)
        files = SlideFiles(staging, partition_col, arrow_schema, tile_compression, direct_io, storage)
        constants = {"tile_format": pa.scalar(dcfg.encoding, pa.string()),
                     "run_id": pa.scalar(lineage.run_id, pa.string()),
                     "config_hash": pa.scalar(lineage.config_hash, pa.string()),
                     "slidelake_version": pa.scalar(lineage.slidelake_version, pa.string()),
                     "created_at": pa.scalar(lineage.created_at, arrow_schema.field("created_at").type)}
        try:
            for table in _overlap_ok(batches, files):
                rows = decoder.rows_per_batch(table.column("tile_extent_x")[0].as_py(),
                                              table.column("tile_extent_y")[0].as_py())
                for start in range(0, table.num_rows, rows):
                    chunk = table.slice(start, rows)
                    col = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in DECODE_COLUMNS}
                    d = decoder.decode(col)  # decode
                    t0 = time.perf_counter()
                    vc = pc.value_counts(chunk.column("slide_id"))
                    counts = {str(k): int(v) for k, v in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}
                    for sid, n in counts.items():
                        files.slide(sid)["decoded"] += n
                    failed = np.array([i for i, e in enumerate(d.errors) if e is not None], np.int64)
                    files.fail(_arrow_failures(chunk, failed, "", "decode", d.errors))
                    idx = pixel_filter(d, fcfg)  # pixel filter
                    if len(idx):  # write
                        files.write(_kept_table(chunk, d, idx, arrow_schema, constants, lineage.path_root),
                                    col["slide_id"][idx])
                    if on_decoded is not None:
                        on_decoded(counts)
                    if on_profile is not None:
                        on_profile({**decoder.profile(d), "write.s": time.perf_counter() - t0})
                    del chunk, col, d  # let the next batch reuse this one's memory
        finally:
            files.close()
            decoder.end_task()
        rows_out = files.results()
        if rows_out:
            yield pa.RecordBatch.from_pylist(rows_out, schema=result_schema)

    return sink


def write_tiles(
    lake: Lake,
    tiles: DataFrame,
    dcfg: DecodeConfig,
    fcfg: FilterConfig,
    lineage: Lineage,
    replace_partitions: list[str] | None,
    tile_compression: str = "none",
    on_decoded: Callable[[dict[str, int]], None] | None = None,
    on_profile: Callable[[dict[str, float]], None] | None = None,
    direct_io: bool = True,
    remote_levels: dict[str, tuple[str | None, list[tuple[int, int]]]] | None = None,
) -> TileWrite:
    """Decode, filter and write ``tiles`` (repartitioned tile rows with ``tile_id``) to the
    lake's tiles table, partitioned by ``slide_id``, in one Delta commit.

    The workers write the files (:func:`make_file_sink`) and the driver commits exactly those
    (:meth:`slidelake.lake.Lake.commit_files`, with the lake's Delta writer).

    Args:
        lake: the lake (its writer and tiles table).
        tiles: rows with the decode inputs (:data:`slidelake.decode.DECODE_COLUMNS`) and every
            non-pixel column of :data:`TILES_COLUMNS`.
        dcfg, fcfg: decode and pixel filter settings.
        lineage: run id, config hash, version, time.
        tile_compression: Parquet codec of the ``tile`` column in the workers' files.
        replace_partitions: slide ids whose partitions this commit replaces (``None``: the
            whole table).
        on_decoded, on_profile: progress and ``--profile`` callbacks (accumulators).
        direct_io: write the tile files around the page cache.
        remote_levels: ``{uri: (vendor, level sizes)}`` of the slides on object storage
            (:class:`slidelake.decode.TileDecoder`).

    Returns:
        :class:`TileWrite`. Nothing is committed when a task fails for good (Spark raises).
    """
    schema = tiles_schema(tiles.schema)
    # one action runs the grid + overlap stage, the broadcast of the slides' columns and the
    # decode + write stage: adaptive execution submits them as jobs of this action, all under
    # its description (the SQL tab shows each stage's plan: MapInArrow overlap, then sink)
    spark = lake.spark
    spark.sparkContext.setJobDescription("overlap + decode + write tiles")
    staging = lake.new_staging("tiles")
    try:
        sink = make_file_sink(dcfg, fcfg, lineage, schema, staging, "slide_id", tile_compression, on_decoded,
                              on_profile, direct_io, lake.storage, remote_levels)
        results = tiles.mapInArrow(sink, schema=TILE_FILES_SCHEMA).collect()
        files = [(r["file"], int(r["rows"])) for r in results if r["file"]]
        size = sum(file_size(join(staging, f), lake.storage) for f, _ in files) if on_profile is not None else 0
        t0 = time.perf_counter()
        res = lake.commit_files("tiles", staging, files, schema, ["slide_id"], replace_partitions, tile_compression)
        if on_profile is not None:  # the driver's side of the write: move the files, one Delta commit
            on_profile({"write.commit_s": time.perf_counter() - t0, "write.files": float(len(files)),
                        "write.bytes": float(size)})
    finally:
        discard_staging(staging, lake.storage)  # empty, or holds the files of failed task attempts
    return _task_outcomes(res, results)


def _task_outcomes(res: WriteResult, results: list[Any]) -> TileWrite:
    """The :class:`TileWrite` of a commit ``res`` from the file sink's task results
    (:data:`TILE_FILES_SCHEMA` rows): decoded and failed tiles per slide, every failure, and
    the written tiles' level-0 rectangles."""
    out = TileWrite(res)
    rects: dict[str, list[np.ndarray]] = {}
    for r in results:
        sid = r["slide_id"]
        out.decoded[sid] = out.decoded.get(sid, 0) + int(r["decoded"])
        out.failed[sid] = out.failed.get(sid, 0) + int(r["failed"])
        out.failures.setdefault(sid, []).extend(f.asDict() for f in r["failures"] or [])
        if r["file"] and r["rects"]:
            rects.setdefault(sid, []).append(np.frombuffer(bytes(r["rects"]), "<i4").reshape(-1, 4))
    out.rects = {sid: np.concatenate(parts) for sid, parts in rects.items()}
    return out
