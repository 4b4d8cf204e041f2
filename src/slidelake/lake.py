"""The lake: one object that owns the lake root, every table's location, the Delta writer and
the operations on the tables.

Tables (Delta, under the lake root, a folder or an ``s3://`` / ``s3a://`` URI): ``slides``,
``masks``, ``<tiles_table>`` (``tiles`` by default), ``tile_errors``, ``run_slides``, ``runs``.
Mask overlays, thumbnails and QC pictures live under ``<overlay root>/overlays/<slide_id>/``
(the lake root unless ``masks.overlay_root`` is set). Object storage is reached with the
``storage`` settings (:mod:`slidelake.storage`).

The Delta writer is chosen once, when the lake is opened (:meth:`Lake.open`):

* ``spark``: Spark's own Delta data source (Databricks, EMR with Delta, or the Delta Lake jars
  on a local session's classpath, see :mod:`slidelake.spark`; Hadoop's S3A for ``s3a://``);
* ``delta-rs``: small tables written from Arrow by delta-rs; the tiles' Parquet files written
  by the Python workers into a staging folder (or prefix) of the table, then committed by
  delta-rs in one commit (:mod:`slidelake.tables`).

Every write is one atomic Delta commit. Slide paths are stored relative to ``path_root`` when
one is given (:func:`slidelake.tables.to_stored`) and made absolute again when read.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from slidelake.config import PipelineConfig, StorageConfig
from slidelake.spark import delta_jars_available
from slidelake.storage import StorageError, check_access, delta_options, delta_uri, filesystem, is_remote, s3a_settings, size
from slidelake.tables import (
    WriteResult, arrow_schema, commit_files, discard_staging, from_stored, local_path, maps_to_dicts, nullable,
    new_staging, retry_on_conflict, rows_by_partition, sql_in, staged_files, table_exists, to_stored,
)

Writer = Literal["spark", "delta-rs"]
TableName = Literal["slides", "masks", "tiles", "tile_errors", "run_slides", "runs"]
TABLES: tuple[TableName, ...] = ("slides", "masks", "tiles", "tile_errors", "run_slides", "runs")


# Spark's vectorized Parquet reader: rows per batch, sized to about this many bytes of rows
READER_BATCH_CONF = "spark.sql.parquet.columnarReaderBatchSize"
READER_BATCH_BYTES = 32 * 2**20
# Spark's Delta writer refuses to merge a schema into a table with NOT NULL inside arrays or maps
# (delta-rs writes ``slides.levels`` so), which it could not enforce anyway: allowed while it merges
UNENFORCED_NOT_NULL_CONF = "spark.databricks.delta.constraints.allowUnenforcedNotNull.enabled"
# tables.tile_compression -> Spark's Parquet codec name
SPARK_CODECS = {"none": "uncompressed", "lz4": "lz4_raw"}


def choose_writer(spark: SparkSession, requested: str = "auto") -> Writer:
    """``spark`` or ``delta-rs`` for ``tables.writer`` = ``auto`` | ``spark`` | ``delta-rs``:
    ``auto`` takes Spark's Delta writer when its jars are on the classpath.

    Raises:
        RuntimeError: ``spark`` asked for but the Delta jars are not on the classpath.
    """
    has_jars = delta_jars_available(spark)
    if requested == "auto":
        return "spark" if has_jars else "delta-rs"
    if requested == "spark" and not has_jars:
        raise RuntimeError(
            "tables.writer=spark but Spark's Delta Lake jars are not on the classpath; add them "
            "(jobs/fetch_jars.sh, then spark-submit --jars) or use tables.writer auto/delta-rs"
        )
    return requested  # type: ignore[return-value]


@contextmanager
def session_conf(spark: SparkSession, key: str, value: str) -> Iterator[None]:
    """Set one runtime setting of ``spark`` for the block, then restore it (or unset it)."""
    before = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        spark.conf.unset(key) if before is None else spark.conf.set(key, before)


def _check_s3a(spark: SparkSession, uri: str) -> None:
    """Open ``uri`` with the Hadoop file system of its scheme (S3A for ``s3a://``) in the driver's
    JVM, so that missing jars (hadoop-aws, the AWS SDK bundle, the S3 analytics accelerator:
    ``jobs/fetch_jars.sh s3``) fail before any work.

    Raises:
        slidelake.storage.StorageError: the JVM cannot open ``uri``; the message is the Java
            error's first line.
    """
    path = spark._jvm.org.apache.hadoop.fs.Path(uri)
    try:
        path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(path)
    except Exception as exc:  # py4j's error: the Java exception is on its second line
        java = next((line.lstrip(": ") for line in str(exc).splitlines() if "java" in line), str(exc))
        raise StorageError(f"Spark cannot open {uri}: {java} (Hadoop's S3A jars: jobs/fetch_jars.sh s3)") from None


@dataclass(frozen=True)
class Lake:
    """A lake root and how its Delta tables are read and written.

    Attributes:
        spark: the session (None for a lake used without Spark: delta-rs rows only).
        root: absolute path or URI of the lake root.
        writer: ``spark`` or ``delta-rs`` (see the module docstring).
        tiles_table: folder name of the tiles table under the root.
        path_root: slide paths under it are stored relative to it (``tables.path_root``).
        overlay_root: folder holding ``overlays/<slide_id>/`` (the root unless set).
        catalog_database: database the tables are registered in by name (``spark`` writer).
        storage: how object storage is reached (:class:`slidelake.config.StorageConfig`).
    """

    spark: SparkSession | None
    root: str
    writer: Writer = "delta-rs"
    tiles_table: str = "tiles"
    path_root: str | None = None
    overlay_root: str | None = None
    catalog_database: str | None = None
    storage: StorageConfig | None = None

    @classmethod
    def open(cls, spark: SparkSession, cfg: PipelineConfig) -> "Lake":
        """The lake of ``cfg`` (``lake``, ``tables``, ``masks.overlay_root``, ``storage``), its
        writer chosen now (:func:`choose_writer`).

        Raises:
            slidelake.storage.StorageError: a root on object storage cannot be reached (no such
                bucket, credentials refused, no server), before any work.
        """
        root = cfg.lake.rstrip("/") if "://" in cfg.lake else os.path.abspath(cfg.lake)
        over = cfg.masks.overlay_root
        overlays = (over if "://" in over else os.path.abspath(over)) if over else root
        for uri in {root, overlays}:
            check_access(uri, cfg.storage)
        writer = choose_writer(spark, cfg.tables.writer)
        if writer == "spark" and is_remote(root):  # the same storage settings for Spark's S3A
            hadoop = spark.sparkContext._jsc.hadoopConfiguration()
            for key, value in s3a_settings(cfg.storage).items():
                hadoop.set(key, value)
            _check_s3a(spark, root)
        return cls(spark, root, writer, cfg.tables.tiles_table, cfg.tables.path_root, overlays,
                   cfg.tables.catalog_database, cfg.storage)

    # ------------------------------------------------------------------ locations

    def path(self, table: TableName) -> str:
        """Location of ``table`` (``tiles`` is the folder ``tiles_table``)."""
        return f"{self.root}/{self.tiles_table if table == 'tiles' else table}"

    @property
    def overlays(self) -> str:
        """Folder holding ``overlays/<slide_id>/`` mask files."""
        return self.overlay_root or self.root

    def exists(self, table: TableName) -> bool:
        """True when ``table`` has a Delta log (other URIs than ``s3://``/``s3a://`` of Spark's
        writer, e.g. ``dbfs:/``: assumed, its readers decide)."""
        p = self.path(table)
        if self.writer == "spark" and "://" in p and not is_remote(p) and not p.startswith("file://"):
            return True
        return table_exists(p if is_remote(p) else local_path(p), self.storage)

    def delta_table(self, table: TableName):
        """``table`` opened by delta-rs (a local folder, or a URI with the storage options)."""
        from deltalake import DeltaTable

        p = self.path(table)
        return DeltaTable(delta_uri(p) if is_remote(p) else local_path(p), storage_options=delta_options(self.storage))

    # ---------------------------------------------------------------------- reads

    def read(self, table: TableName, schema: T.StructType | None = None) -> DataFrame:
        """``table`` as a Spark DataFrame (the current version's active files only).

        Raises:
            FileNotFoundError: the table does not exist and no ``schema`` (of an empty result)
                was given.
        """
        p = self.path(table)
        if not self.exists(table):
            if schema is None:
                raise FileNotFoundError(f"no Delta table at {p}")
            return self.spark.createDataFrame([], schema)
        if self.writer == "spark":
            return self.spark.read.format("delta").load(p)
        from deltalake import DeltaTable

        dt = DeltaTable(local_path(p))
        tschema = T.StructType.fromJson(json.loads(dt.schema().to_json()))
        files = list(dt.file_uris())
        if not files:
            return self.spark.createDataFrame([], tschema)
        return self.spark.read.schema(tschema).option("basePath", local_path(p)).parquet(*files)

    def read_rows(self, table: TableName, schema: T.StructType) -> list[dict]:
        """All rows of a small table (``slides``, ``masks``, ``runs``, ...) as dicts, ``path``
        absolute; ``[]`` when the table does not exist. With delta-rs the active Parquet files
        are read with pyarrow, without a Spark job."""
        if self.writer == "spark":
            rows = [r.asDict(recursive=True) for r in self.read(table, schema).collect()]
        elif not self.exists(table):
            rows = []
        else:
            import pyarrow.parquet as pq
            from urllib.parse import unquote

            uris = self.delta_table(table).file_uris()
            fs = filesystem(uris[0], self.storage)[0] if uris else None
            files = [filesystem(unquote(u), self.storage)[1] for u in uris]
            rows = (maps_to_dicts(pq.read_table(files, schema=arrow_schema(schema), filesystem=fs).to_pylist(), schema)
                    if files else [])
        if self.path_root and "path" in schema.fieldNames():
            for r in rows:
                r["path"] = from_stored(r.get("path"), self.path_root)
        return rows

    def read_columns(self, table: TableName, columns: list[str], slide_ids: list[str] | None = None):
        """A few ``columns`` of ``table`` (e.g. tile coordinates, never the pixels) as a
        ``pyarrow.Table``, only the ``slide_id`` partitions in ``slide_ids`` when given; a table
        with no columns when ``table`` does not exist."""
        import pyarrow as pa

        if not self.exists(table):
            return pa.table({})
        if slide_ids is not None and not slide_ids:
            return pa.table({c: [] for c in columns})
        if self.writer == "spark":
            df = self.read(table)
            if slide_ids is not None:
                df = df.where(F.col("slide_id").isin(list(slide_ids)))
            return df.select(*columns).toArrow()
        parts = [("slide_id", "in", list(slide_ids))] if slide_ids else None
        return self.delta_table(table).to_pyarrow_table(filters=parts, columns=columns)

    def partition_values(self, table: TableName, column: str = "slide_id") -> set[str]:
        """Values of the partition ``column`` present in ``table``'s current version (from the
        log's add actions with delta-rs); empty when there is no table."""
        if not self.exists(table):
            return set()
        if self.writer == "spark":
            return {r[0] for r in self.read(table).select(column).distinct().collect()}
        import pyarrow as pa

        actions = pa.table(self.delta_table(table).get_add_actions(flatten=True))
        key = f"partition.{column}"
        return {v for v in actions.column(key).to_pylist() if v is not None} if key in actions.column_names else set()

    # --------------------------------------------------------------------- writes

    def write_rows(self, table: TableName, rows: list[dict], schema: T.StructType, mode: str = "append",
                   replace_where: str | None = None) -> WriteResult:
        """Write a few driver-held ``rows`` to ``table`` in one commit.

        ``mode``: ``append`` or ``overwrite``; with ``replace_where`` (a SQL predicate, e.g.
        :func:`slidelake.tables.sql_in` of the paths just scanned) ``overwrite`` replaces only
        the matching rows (Delta ``replaceWhere``; delta-rs ``predicate``), so concurrent runs
        writing other rows keep theirs. With delta-rs the rows go from Arrow to
        ``deltalake.write_deltalake`` without a Spark job.
        """
        p = self.path(table)
        if self.path_root and "path" in schema.fieldNames():
            rows = [{**r, "path": to_stored(r.get("path"), self.path_root)} for r in rows]
        self._describe(f"write {table}")
        if self.writer == "spark":
            df = self.spark.createDataFrame(rows, schema=nullable(schema, deep=True)).coalesce(1)
            if mode == "overwrite" and replace_where is not None:
                def save() -> None:  # a new table: append, so a concurrent creator's rows are never overwritten
                    w = df.write.format("delta").option("mergeSchema", "true")  # an older table gains new columns
                    w = w.mode("overwrite").option("replaceWhere", replace_where) if self.exists(table) else w.mode("append")
                    with session_conf(self.spark, UNENFORCED_NOT_NULL_CONF, "true"):
                        w.save(p)

                retry_on_conflict(save)
                return self._spark_result(p)
            return self.write_frame(table, df, mode)
        import pyarrow as pa
        from deltalake import write_deltalake

        uri = delta_uri(p) if is_remote(p) else local_path(p)
        if not is_remote(p):
            os.makedirs(uri, exist_ok=True)
        opts = delta_options(self.storage)
        data = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema.fields} for r in rows],
                                    schema=arrow_schema(schema))

        def commit() -> None:
            if mode == "overwrite" and replace_where is not None:
                if self.exists(table):
                    write_deltalake(uri, data, mode="overwrite", predicate=replace_where, schema_mode="merge",
                                    storage_options=opts)
                else:  # a new table: append, so a concurrent creator's rows are never overwritten
                    write_deltalake(uri, data, mode="append", schema_mode="merge", storage_options=opts)
            else:  # an older table gains new columns (append) or the new schema (overwrite)
                write_deltalake(uri, data, mode=mode, schema_mode="merge" if mode == "append" else "overwrite",
                                storage_options=opts)

        retry_on_conflict(commit)
        return WriteResult(self.delta_table(table).version(), 1, len(rows))

    def write_frame(self, table: TableName, df: DataFrame, mode: str = "append", partition_by: list[str] | None = None,
                    replace_partitions: list[str] | None = None) -> WriteResult:
        """Write the Spark DataFrame ``df`` to ``table`` in one commit.

        Args:
            mode: ``append`` or ``overwrite``.
            partition_by: partition columns (the first one is used by ``replace_partitions``).
            replace_partitions: with ``overwrite``, replace only these values of the first
                partition column (every other partition is kept; an empty list only appends);
                ``None`` with ``overwrite`` replaces the whole table.

        Raises:
            ValueError: bad ``mode``, or ``replace_partitions`` without ``partition_by``.
        """
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be append or overwrite, not {mode!r}")
        partition_by = partition_by or []
        if replace_partitions is not None and not partition_by:
            raise ValueError("replace_partitions needs partition_by")
        p = self.path(table)
        if self.writer == "spark":
            return self._write_frame_spark(df, p, mode, partition_by, replace_partitions)
        import pyarrow.parquet as pq

        os.makedirs(local_path(p), exist_ok=True)
        staging = new_staging(p)
        try:
            # zstd level 1: tile bytes (already-compressed JPEG or raw pixels) gain little from higher levels
            w = df.write.mode("overwrite").option("compression", "zstd").option("parquet.compression.codec.zstd.level", "1")
            if partition_by:
                w = w.partitionBy(*partition_by)
            w.parquet(staging)
            files = [(os.path.relpath(f, staging).replace(os.sep, "/"), pq.read_metadata(f).num_rows)
                     for f in staged_files(staging)]
            return commit_files(p, staging, files, df.schema, mode, partition_by, replace_partitions)
        finally:
            discard_staging(staging)

    def _write_frame_spark(self, df: DataFrame, p: str, mode: str, partition_by: list[str],
                           replace_partitions: list[str] | None, by_partition: dict[str, int] | None = None,
                           compression: str | None = None) -> WriteResult:
        if mode == "overwrite" and replace_partitions == []:
            mode = "append"  # nothing to replace
        w = df.write.format("delta").mode(mode)
        if compression is not None:
            w = w.option("compression", SPARK_CODECS.get(compression, compression))
        if partition_by:
            w = w.partitionBy(*partition_by)
        if mode == "overwrite" and replace_partitions:
            w = w.option("replaceWhere", sql_in(f"`{partition_by[0]}`", replace_partitions))
        elif mode == "overwrite" and replace_partitions is None:
            w = w.option("overwriteSchema", "true")
        if not (mode == "overwrite" and replace_partitions is None):
            w = w.option("mergeSchema", "true")  # an older table gains new columns

        def save() -> None:
            with session_conf(self.spark, UNENFORCED_NOT_NULL_CONF, "true"):
                w.save(p)

        retry_on_conflict(save)
        res = self._spark_result(p)
        if by_partition is not None:
            res.rows_by_partition = by_partition
        elif partition_by and replace_partitions and res.version is not None:
            # the replaced partitions hold exactly the rows just written: count them back (partition column only)
            added = self.spark.read.format("delta").option("versionAsOf", res.version).load(p)
            added = added.where(F.col(partition_by[0]).isin(replace_partitions))
            res.rows_by_partition = {r[0]: int(r[1]) for r in added.groupBy(partition_by[0]).count().collect()}
        return res

    def _spark_result(self, p: str) -> WriteResult:
        hist = self.spark.sql(f"DESCRIBE HISTORY delta.`{p}` LIMIT 1").collect()
        if not hist:
            return WriteResult(None, 0, 0)
        metrics = hist[0]["operationMetrics"] or {}
        return WriteResult(int(hist[0]["version"]), int(metrics.get("numFiles", 0)), int(metrics.get("numOutputRows", 0)))

    def new_staging(self, table: TableName) -> str:
        """A fresh staging folder (or object-storage prefix) for data files of ``table`` that
        :meth:`commit_files` will commit: ``<table>/_staging/<uuid>``
        (:func:`slidelake.tables.new_staging`)."""
        return new_staging(self.path(table), self.storage)

    def commit_files(self, table: TableName, staging: str, files: list[tuple[str, int]], schema: T.StructType,
                     partition_by: list[str], replace_partitions: list[str] | None,
                     compression: str = "none") -> WriteResult:
        """Commit exactly ``files`` (``(path relative to staging, rows)``, Hive-style
        ``key=value`` folders for the partition values) from ``staging`` to ``table`` in one
        commit, replacing the ``replace_partitions`` values of the first of ``partition_by``
        (``None``: the whole table; an empty list only appends).

        ``compression``: the Parquet codec of the files Spark writes (``none``, ``zstd``,
        ``lz4``, ``snappy``; the delta-rs writer commits the staged files as they are).

        delta-rs moves the files into the table and adds them to the log
        (:func:`slidelake.tables.commit_files`). Spark's Delta writer has no public call that
        adds files written elsewhere, so Spark reads exactly these files and writes their rows
        into the table (``replaceWhere`` on the replaced partitions); the staged files are
        then the caller's to discard.
        """
        if self.writer != "spark":
            return commit_files(self.path(table), staging, files, schema, "overwrite", partition_by, replace_partitions,
                                self.storage)
        self._describe(f"commit {table}")
        rows = sum(n for _, n in files)
        nbytes = sum(size(f"{staging}/{rel}", self.storage) for rel, _ in files)
        # Spark's vectorized Parquet reader holds 4,096 rows a batch by default: with tiles of
        # 20-200 KB that is hundreds of MiB per batch, and reading staged tiles took 3x longer
        batch = str(max(16, min(4096, READER_BATCH_BYTES * max(1, rows) // max(1, nbytes))))
        with session_conf(self.spark, READER_BATCH_CONF, batch):
            # a local folder named as one (not the cluster's default file system), or the bucket
            base = staging if is_remote(staging) else "file://" + os.path.abspath(staging)
            df = (self.spark.read.schema(schema).option("basePath", base)
                  .parquet(*(f"{base}/{rel}" for rel, _ in files)).select(*schema.fieldNames())
                  if files else self.spark.createDataFrame([], schema))  # no kept tile: the partitions empty
            return self._write_frame_spark(df, self.path(table), "overwrite", partition_by, replace_partitions,
                                           rows_by_partition(files, partition_by), compression)

    def register(self) -> None:
        """Register the tables by name in ``catalog_database`` (``CREATE TABLE IF NOT EXISTS
        db.name USING DELTA LOCATION``); only with the ``spark`` writer, a no-op otherwise."""
        if not self.catalog_database or self.writer != "spark":
            return
        db = self.catalog_database
        self.spark.sql(f"CREATE DATABASE IF NOT EXISTS `{db}`")
        for table in TABLES:
            name = self.tiles_table if table == "tiles" else table
            if table != "run_slides" and self.exists(table):
                self.spark.sql(f"CREATE TABLE IF NOT EXISTS `{db}`.`{name}` USING DELTA LOCATION '{self.path(table)}'")

    def _describe(self, text: str) -> None:
        if self.spark is not None:
            self.spark.sparkContext.setJobDescription(text)


__all__ = ["Lake", "Writer", "TableName", "TABLES", "choose_writer"]
