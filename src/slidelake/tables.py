"""Delta tables of the lake: ``<lake>/slides``, ``<lake>/<tiles_table>``, ``<lake>/runs``.

Two writers produce the same standard Delta tables:

* ``spark``: Spark's own Delta data source (Databricks, EMR with Delta, ``--packages``);
* ``delta-rs``: where the Delta jars are absent (offline machines, this project's CI). Parquet
  files are written into ``<table>/_staging/<uuid>/`` (by Spark, or for the tiles by the
  Python workers themselves, :mod:`slidelake.write`); exactly the files of the successful task
  attempts are moved next to the table's data and committed to the Delta log by delta-rs in
  **one** commit (:func:`commit_files`). A failure before the commit leaves the table as it
  was (staged files are deleted, :func:`discard_staging`; files never committed are invisible
  to every Delta reader). Reads list the log's active files
  only, never the folder.

Every write is one atomic Delta commit: ``append``, ``overwrite`` (whole table) or
``overwrite`` restricted to ``replace_partitions`` values of the first partition column
(replaceWhere semantics).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from slidelake.spark import delta_jars_available

STAGING_DIR = "_staging"


@dataclass
class WriteResult:
    """What one table write committed.

    Attributes:
        version: Delta table version after the commit (None when unknown).
        files: data files added.
        rows: rows added (from the Parquet footers, or counted back for the spark writer).
        rows_by_partition: rows added per value of the first partition column.
    """

    version: int | None
    files: int
    rows: int
    rows_by_partition: dict[str, int] = field(default_factory=dict)


def resolve_writer(spark: SparkSession, writer: str) -> str:
    """Pick ``spark`` or ``delta-rs`` for ``writer`` = ``auto`` | ``spark`` | ``delta-rs``.

    Raises:
        RuntimeError: ``spark`` asked for but the Delta jars are not on the classpath.
    """
    has_jars = delta_jars_available(spark)
    if writer == "auto":
        return "spark" if has_jars else "delta-rs"
    if writer == "spark" and not has_jars:
        raise RuntimeError(
            "tables.writer=spark but Spark's Delta Lake jars are not on the classpath; add them "
            "(e.g. --packages io.delta:delta-spark_2.13:4.4.1) or use writer auto/delta-rs"
        )
    return writer


def table_exists(path: str) -> bool:
    """True when ``path`` holds a Delta log."""
    return os.path.isdir(os.path.join(path, "_delta_log")) and any(
        f.endswith(".json") or f.endswith(".checkpoint.parquet")
        for f in os.listdir(os.path.join(path, "_delta_log"))
    )


def _local(path: str) -> str:
    if "://" in path and not path.startswith("file://"):
        raise ValueError(
            f"{path}: the delta-rs writer supports local lake roots only; on object storage "
            "use Spark's Delta writer (Delta jars on the classpath)"
        )
    return os.path.abspath(path.removeprefix("file://"))


def _nullable(schema: T.StructType) -> T.StructType:
    return T.StructType([T.StructField(f.name, f.dataType, True, f.metadata) for f in schema.fields])


def read_table(spark: SparkSession, path: str, writer: str, schema: T.StructType | None = None) -> DataFrame:
    """Read a Delta table as a Spark DataFrame (the current version's active files only).

    Args:
        spark: the session.
        path: table folder.
        writer: ``spark`` or ``delta-rs`` (as returned by :func:`resolve_writer`).
        schema: schema of an empty result when the table does not exist yet.

    Raises:
        FileNotFoundError: the table does not exist and no ``schema`` was given.
    """
    if writer == "spark":
        if schema is not None and not table_exists(path) and "://" not in path:
            return spark.createDataFrame([], schema)
        return spark.read.format("delta").load(path)
    local = _local(path)
    if not table_exists(local):
        if schema is None:
            raise FileNotFoundError(f"no Delta table at {path}")
        return spark.createDataFrame([], schema)
    from deltalake import DeltaTable

    dt = DeltaTable(local)
    tschema = T.StructType.fromJson(json.loads(dt.schema().to_json()))
    files = list(dt.file_uris())
    if not files:
        return spark.createDataFrame([], tschema)
    return spark.read.schema(tschema).option("basePath", local).parquet(*files)


def _staged_files(staging: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(staging):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        out += [os.path.join(root, f) for f in files if f.endswith(".parquet") and not f.startswith((".", "_"))]
    return sorted(out)


def _partition_values(rel: str, partition_by: list[str]) -> dict[str, str | None]:
    vals: dict[str, str | None] = {}
    for part in rel.split("/")[:-1]:
        if "=" in part:
            k, v = part.split("=", 1)
            v = unquote(v)
            vals[k] = None if v == "__HIVE_DEFAULT_PARTITION__" else v
    return {k: vals.get(k) for k in partition_by}


def write_table(
    spark: SparkSession,
    df: DataFrame,
    path: str,
    writer: str,
    mode: str = "append",
    partition_by: list[str] | None = None,
    replace_partitions: list[str] | None = None,
    description: str = "write",
) -> WriteResult:
    """Write ``df`` to the Delta table at ``path`` in one commit.

    Args:
        spark: the session.
        df: rows to write.
        path: table folder (created when absent).
        writer: ``spark`` or ``delta-rs``.
        mode: ``append`` or ``overwrite``.
        partition_by: partition columns (first one is used by ``replace_partitions``).
        replace_partitions: with ``mode='overwrite'``, replace only these values of the first
            partition column (every other partition is kept); an empty list replaces nothing and
            only appends. ``None`` with ``overwrite`` replaces the whole table.
        description: Spark job description (shows in the Spark UI).

    Returns:
        :class:`WriteResult`.

    Raises:
        ValueError: bad mode, or ``replace_partitions`` without ``partition_by``.
    """
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be append or overwrite, not {mode!r}")
    partition_by = partition_by or []
    if replace_partitions is not None and not partition_by:
        raise ValueError("replace_partitions needs partition_by")
    spark.sparkContext.setJobDescription(description)
    if writer == "spark":
        return _write_spark(spark, df, path, mode, partition_by, replace_partitions)
    return _write_delta_rs(df, path, mode, partition_by, replace_partitions)


def _write_spark(spark, df, path, mode, partition_by, replace_partitions) -> WriteResult:
    from pyspark.sql import functions as F

    w = df.write.format("delta").mode(mode)
    if partition_by:
        w = w.partitionBy(*partition_by)
    if mode == "overwrite" and replace_partitions is not None:
        key = partition_by[0]
        if not replace_partitions:
            w = df.write.format("delta").mode("append").partitionBy(*partition_by)
        else:
            quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in replace_partitions)
            w = w.option("replaceWhere", f"`{key}` IN ({quoted})")
    elif mode == "overwrite":
        w = w.option("overwriteSchema", "true")
    w.save(path)
    hist = spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").collect()
    version = int(hist[0]["version"]) if hist else None
    metrics = hist[0]["operationMetrics"] if hist else {}
    rows = int((metrics or {}).get("numOutputRows", 0))
    by_part: dict[str, int] = {}
    if partition_by and replace_partitions and version is not None:
        # the replaced partitions hold exactly the rows just written; counting them back is
        # exact and reads only the partition column
        added = spark.read.format("delta").option("versionAsOf", version).load(path)
        added = added.where(F.col(partition_by[0]).isin(replace_partitions))
        by_part = {r[0]: int(r[1]) for r in added.groupBy(partition_by[0]).count().collect()}
    files = int((metrics or {}).get("numFiles", 0))
    return WriteResult(version, files, rows, by_part)


def new_staging(path: str) -> str:
    """Create and return a fresh staging folder ``<table>/_staging/<uuid>/`` for data files
    that :func:`commit_files` will move into the table. Local paths only.

    Raises:
        ValueError: ``path`` is a remote URI (the delta-rs writer is local only).
    """
    local = _local(path)
    clean_stale_staging(local)
    staging = os.path.join(local, STAGING_DIR, uuid.uuid4().hex)
    for attempt in range(3):
        try:
            os.makedirs(staging, exist_ok=True)
            break
        except FileNotFoundError:  # a background discard removed the empty ``_staging`` meanwhile
            if attempt == 2:
                raise
    return staging


STALE_STAGING_S = 24 * 3600


def clean_stale_staging(path: str, max_age_s: float = STALE_STAGING_S) -> list[str]:
    """Delete staging folders of ``path`` not modified for ``max_age_s`` seconds: left by a
    driver killed before its commit (never part of the table). Younger ones may belong to a
    run in progress and are kept. Returns the folders deleted."""
    import time

    parent = os.path.join(path, STAGING_DIR)
    try:
        names = os.listdir(parent)
    except FileNotFoundError:  # none, or a background discard removed it meanwhile
        return []
    gone = []
    for name in names:
        d = os.path.join(parent, name)
        try:
            newest = max([os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs]
                         + [os.path.getmtime(d)])
        except FileNotFoundError:  # removed meanwhile (a background discard)
            continue
        if time.time() - newest > max_age_s:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def discard_staging(staging: str) -> None:
    """Delete a staging folder and whatever it holds (files of failed or superseded task
    attempts included), and its ``_staging`` parent when that is left empty."""
    shutil.rmtree(staging, ignore_errors=True)
    parent = os.path.dirname(staging)
    if os.path.basename(parent) == STAGING_DIR and os.path.isdir(parent) and not os.listdir(parent):
        try:
            os.rmdir(parent)
        except OSError:  # a new staging folder appeared meanwhile, or another discard removed it
            pass


def commit_files(
    path: str,
    staging: str,
    files: list[tuple[str, int]],
    schema: T.StructType,
    mode: str = "append",
    partition_by: list[str] | None = None,
    replace_partitions: list[str] | None = None,
) -> WriteResult:
    """Move exactly ``files`` from ``staging`` into the table at ``path`` and commit them to
    the Delta log with delta-rs in **one** commit.

    Only the listed files are committed: files a failed or superseded task attempt left in
    ``staging`` are not, so a retried task never duplicates rows. The caller discards
    ``staging`` afterwards (:func:`discard_staging`), also on failure; files moved but never
    committed are invisible to every Delta reader.

    Args:
        path: table folder (created with the first commit).
        staging: folder from :func:`new_staging`.
        files: ``(relative path under staging, rows)``; Hive-style ``key=value`` folders give
            the partition values.
        schema: the table's Spark schema (partition columns included).
        mode, partition_by, replace_partitions: as for :func:`write_table`.

    Raises:
        FileExistsError: a data file of that name already exists in the table.
    """
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    local = _local(path)
    partition_by = partition_by or []
    adds: list[AddAction] = []
    by_part: dict[str, int] = {}
    total = 0
    for rel, n in sorted(files):
        src = os.path.join(staging, rel)
        dst = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):  # names carry a UUID; never clobber a file
            raise FileExistsError(f"refusing to overwrite existing data file {dst}")
        os.replace(src, dst)
        st = os.stat(dst)
        pvals = _partition_values(rel, partition_by)
        adds.append(AddAction(
            path=rel, size=st.st_size, partition_values=pvals,
            modification_time=int(st.st_mtime * 1000), data_change=True,
            stats=json.dumps({"numRecords": int(n)}),
        ))
        total += int(n)
        if partition_by:
            key = pvals[partition_by[0]] or ""
            by_part[key] = by_part.get(key, 0) + int(n)

    dschema = Schema.from_json(_nullable(schema).json())

    def commit() -> None:
        if not table_exists(local):
            create_table_with_add_actions(local, dschema, adds, mode="error", partition_by=partition_by or None)
            return
        dt = DeltaTable(local)
        if mode == "overwrite" and replace_partitions is not None:
            if replace_partitions:
                dt.create_write_transaction(
                    adds, mode="overwrite", schema=dschema, partition_by=partition_by,
                    partition_filters=[(partition_by[0], "in", list(replace_partitions))],
                )
            else:
                dt.create_write_transaction(adds, mode="append", schema=dschema, partition_by=partition_by)
        else:
            dt.create_write_transaction(adds, mode=mode, schema=dschema, partition_by=partition_by or None)

    retry_on_conflict(commit)
    return WriteResult(DeltaTable(local).version(), len(adds), total, by_part)


def _is_conflict(exc: BaseException) -> bool:
    from deltalake.exceptions import CommitFailedError, DeltaError

    if isinstance(exc, CommitFailedError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (DeltaError, OSError)) and any(
        w in msg for w in ("already exists", "version", "conflict", "concurrent"))


def retry_on_conflict(commit, attempts: int = 8) -> None:
    """Run a Delta ``commit()``; when another writer committed first (a Delta commit conflict,
    or two runs creating the same table at once), try again with a fresh snapshot after a short
    random back-off. Delta's optimistic concurrency makes this safe: a transaction that really
    conflicts (e.g. both replace the same partition) fails again and the error is raised after
    ``attempts`` tries."""
    import random
    import time

    for i in range(attempts):
        try:
            commit()
            return
        except Exception as exc:  # noqa: BLE001 - re-raised unless a commit conflict
            if i == attempts - 1 or not _is_conflict(exc):
                raise
            time.sleep(random.uniform(0.01, 0.05) * 2 ** i)


def _write_delta_rs(df, path, mode, partition_by, replace_partitions) -> WriteResult:
    import pyarrow.parquet as pq

    local = _local(path)
    os.makedirs(local, exist_ok=True)
    staging = new_staging(local)
    try:
        # zstd level 1: tile bytes (already-compressed JPEG or raw pixels) gain little from higher levels
        w = df.write.mode("overwrite").option("compression", "zstd").option("parquet.compression.codec.zstd.level", "1")
        if partition_by:
            w = w.partitionBy(*partition_by)
        w.parquet(staging)
        files = [(os.path.relpath(f, staging).replace(os.sep, "/"), pq.read_metadata(f).num_rows)
                 for f in _staged_files(staging)]
        return commit_files(local, staging, files, df.schema, mode, partition_by, replace_partitions)
    finally:
        discard_staging(staging)


def read_rows(spark: SparkSession, path: str, writer: str, schema: T.StructType,
              path_root: str | None = None) -> list[dict]:
    """All rows of a small table (``slides``, ``masks``, ``runs``) as dicts on the driver.

    With ``delta-rs`` the table's active Parquet files (from the Delta log) are read with
    pyarrow directly, without a Spark job; with ``spark`` through Spark. A missing table gives
    ``[]``. ``path_root``: stored relative ``path`` values are made absolute (:func:`from_stored`).
    """
    rows = _read_rows(spark, path, writer, schema)
    if path_root and "path" in schema.fieldNames():
        for r in rows:
            r["path"] = from_stored(r.get("path"), path_root)
    return rows


def _read_rows(spark: SparkSession, path: str, writer: str, schema: T.StructType) -> list[dict]:
    if writer == "spark":
        return [r.asDict(recursive=True) for r in read_table(spark, path, writer, schema).collect()]
    local = _local(path)
    if not table_exists(local):
        return []
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    files = [unquote(u.removeprefix("file://")) for u in DeltaTable(local).file_uris()]
    if not files:
        return []
    table = pq.read_table(files, schema=_arrow_schema(schema))
    return _maps_to_dicts(table.to_pylist(), schema)


def read_columns(spark: SparkSession, path: str, writer: str, columns: list[str],
                 slide_ids: list[str] | None = None):
    """A few columns of a table (e.g. tile coordinates, never the pixels) as a ``pyarrow.Table``,
    optionally only the ``slide_id`` partitions in ``slide_ids``.

    With ``delta-rs`` only those columns of the matching active files are read, with pyarrow
    (no Spark job); with ``spark`` through Spark (``DataFrame.toArrow``). A missing table gives
    an empty table with no columns.
    """
    import pyarrow as pa

    if writer == "spark":
        from pyspark.sql import functions as F

        try:
            df = read_table(spark, path, writer)
        except Exception:  # noqa: BLE001 - no table yet
            return pa.table({})
        if slide_ids is not None:
            df = df.where(F.col("slide_id").isin(list(slide_ids)))
        return df.select(*columns).toArrow()
    local = _local(path)
    if not table_exists(local):
        return pa.table({})
    from deltalake import DeltaTable

    if slide_ids is not None and not slide_ids:
        return pa.table({c: [] for c in columns})
    parts = [("slide_id", "in", list(slide_ids))] if slide_ids else None
    return DeltaTable(local).to_pyarrow_table(filters=parts, columns=columns)


def partition_values(spark: SparkSession, path: str, writer: str, column: str = "slide_id") -> set[str]:
    """Values of a partition column present in a table's current version (from the Delta log's
    add actions with ``delta-rs``; a distinct query with ``spark``); empty when no table."""
    if writer == "spark":
        try:
            df = read_table(spark, path, writer)
        except Exception:  # noqa: BLE001 - no table yet
            return set()
        return {r[0] for r in df.select(column).distinct().collect()}
    local = _local(path)
    if not table_exists(local):
        return set()
    from deltalake import DeltaTable

    import pyarrow as pa

    actions = pa.table(DeltaTable(local).get_add_actions(flatten=True))
    key = f"partition.{column}"
    return {v for v in actions.column(key).to_pylist() if v is not None} if key in actions.column_names else set()


def to_stored(path: str | None, root: str | None) -> str | None:
    """The form of a slide path written to the tables: relative to ``root`` (``tables.path_root``)
    when the file is under it, else unchanged (absolute)."""
    if not root or path is None:
        return path
    root = os.path.abspath(root)
    if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, root)
    return path


def from_stored(path: str | None, root: str | None) -> str | None:
    """Inverse of :func:`to_stored`: the absolute path of a stored slide path."""
    if not root or path is None or os.path.isabs(path):
        return path
    return os.path.join(os.path.abspath(root), path)


def sql_in(column: str, values) -> str:
    """A SQL predicate ``column IN ('a', 'b')`` (quotes doubled; ``FALSE`` for no values)."""
    vals = sorted({str(v) for v in values})
    if not vals:
        return "FALSE"
    return f"{column} IN (" + ", ".join("'" + v.replace("'", "''") + "'" for v in vals) + ")"


def write_rows(spark: SparkSession, rows: list[dict], schema: T.StructType, path: str, writer: str,
               mode: str = "append", description: str = "write", replace_where: str | None = None,
               path_root: str | None = None) -> WriteResult:
    """Write a few driver-held rows (``slides``, ``masks``, ``runs``, ...) as one Delta commit.

    ``replace_where`` (with ``mode='overwrite'``): replace only the rows matching this SQL
    predicate, e.g. :func:`sql_in` of the paths just scanned, so concurrent runs writing other
    rows of the same table do not overwrite each other (Delta ``replaceWhere``; delta-rs
    ``predicate``). Without it, ``overwrite`` replaces the whole table.

    With ``delta-rs`` the rows go from Arrow straight to ``deltalake.write_deltalake`` (no Spark
    job: a small table costs milliseconds, not a Spark job's seconds); with ``spark`` through
    Spark's Delta writer. ``path_root``: a ``path`` column is stored relative to it
    (:func:`to_stored`).
    """
    if path_root and "path" in schema.fieldNames():
        rows = [{**r, "path": to_stored(r.get("path"), path_root)} for r in rows]
    if writer == "spark":
        df = spark.createDataFrame(rows, schema=schema).coalesce(1)
        if mode == "overwrite" and replace_where is not None:
            spark.sparkContext.setJobDescription(description)
            w = df.write.format("delta")
            try:
                read_table(spark, path, writer)
                w = w.mode("overwrite").option("replaceWhere", replace_where)
            except Exception:  # noqa: BLE001 - no table yet: create it
                w = w.mode("append")
            w.save(path)
            return WriteResult(None, 1, len(rows))
        return write_table(spark, df, path, writer, mode=mode, description=description)
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    local = _local(path)
    os.makedirs(local, exist_ok=True)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema.fields} for r in rows],
                                 schema=_arrow_schema(schema))
    def commit() -> None:
        if mode == "overwrite" and replace_where is not None:
            if table_exists(local):
                write_deltalake(local, table, mode="overwrite", predicate=replace_where, schema_mode="merge")
            else:  # a new table: append, so a concurrent creator's rows are never overwritten
                write_deltalake(local, table, mode="append", schema_mode="merge")
        else:
            # a table written by an older slidelake gains the new columns (append) or the new schema (overwrite)
            write_deltalake(local, table, mode=mode, schema_mode="merge" if mode == "append" else "overwrite")

    retry_on_conflict(commit)
    return WriteResult(DeltaTable(local).version(), 1, len(rows))


def _arrow_schema(schema: T.StructType):
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(_nullable(schema), timezone="UTC")


def _maps_to_dicts(rows: list[dict], schema: T.StructType) -> list[dict]:
    """pyarrow gives map columns as lists of (key, value) tuples; make them dicts."""
    maps = [f.name for f in schema.fields if isinstance(f.dataType, T.MapType)]
    for r in rows:
        for m in maps:
            if r.get(m) is not None:
                r[m] = dict(r[m])
    return rows


def register_tables(spark: SparkSession, database: str, tables: dict[str, str]) -> None:
    """Register Delta tables by name: ``CREATE TABLE IF NOT EXISTS db.name USING DELTA LOCATION``.

    Only meaningful with Spark's Delta data source (Databricks, EMR).
    """
    spark.sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    for name, loc in tables.items():
        spark.sql(f"CREATE TABLE IF NOT EXISTS `{database}`.`{name}` USING DELTA LOCATION '{loc}'")

