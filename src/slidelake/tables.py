"""What the ``delta-rs`` writer does underneath :class:`slidelake.lake.Lake`, and the stored
form of slide paths.

Parquet files are written into ``<table>/_staging/<uuid>/`` (by Spark, or for the tiles by the
Python workers themselves, :mod:`slidelake.write`), a folder or, for a lake in a bucket, a key
prefix; exactly the files of the successful task attempts are moved next to the table's data
(a rename; in a bucket a copy inside the store, 8 at a time) and committed to the Delta log by
delta-rs in **one** commit (:func:`commit_files`). A failure before the commit leaves the table
as it was (staged files are deleted, :func:`discard_staging`, or by the next run once stale,
:func:`clean_stale_staging`; files never committed are invisible to every Delta reader). Reads
list the log's active files only, never the folder. delta-rs commits to S3 with conditional
writes (``If-None-Match``), so concurrent writers need no lock service.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

from pyspark.sql import types as T

from slidelake.config import StorageConfig
from slidelake.storage import delta_options, delta_uri, filesystem, is_remote, join, remove_tree


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


def table_exists(path: str, storage: StorageConfig | None = None) -> bool:
    """True when ``path`` (a folder or ``s3://`` URI) holds a Delta log."""
    if is_remote(path):
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(delta_uri(path), delta_options(storage))
    return os.path.isdir(os.path.join(path, "_delta_log")) and any(
        f.endswith(".json") or f.endswith(".checkpoint.parquet")
        for f in os.listdir(os.path.join(path, "_delta_log"))
    )


def local_path(path: str) -> str:
    """The absolute local path of ``path`` (a folder or ``file://`` URI).

    Raises:
        ValueError: ``path`` is on object storage (reads and writes through Spark's Parquet
            files, which need Spark's own S3 support there).
    """
    if "://" in path and not path.startswith("file://"):
        raise ValueError(f"{path}: this operation needs a local lake root or Spark's Delta writer")
    return os.path.abspath(path.removeprefix("file://"))


def nullable(schema: T.StructType, deep: bool = False) -> T.StructType:
    """``schema`` with every top-level field nullable; with ``deep``, the fields of nested
    structs, array elements and map values too (Spark's Delta writer refuses NOT NULL inside
    arrays and maps when it merges a schema)."""
    def relax(dt: T.DataType) -> T.DataType:
        if isinstance(dt, T.StructType):
            return nullable(dt, True)
        if isinstance(dt, T.ArrayType):
            return T.ArrayType(relax(dt.elementType), True)
        if isinstance(dt, T.MapType):
            return T.MapType(dt.keyType, relax(dt.valueType), True)
        return dt

    return T.StructType([T.StructField(f.name, relax(f.dataType) if deep else f.dataType, True, f.metadata)
                         for f in schema.fields])


def staged_files(staging: str) -> list[str]:
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


def rows_by_partition(files: list[tuple[str, int]], partition_by: list[str]) -> dict[str, int]:
    """Rows per value of the first of ``partition_by`` (``""`` for null) of staged ``files``
    (``(relative path with Hive-style key=value folders, rows)``); empty without partitions."""
    out: dict[str, int] = {}
    if partition_by:
        for rel, n in files:
            key = _partition_values(rel, partition_by)[partition_by[0]] or ""
            out[key] = out.get(key, 0) + int(n)
    return out


def new_staging(path: str, storage: StorageConfig | None = None) -> str:
    """A fresh staging folder ``<table>/_staging/<uuid>`` (a folder or an ``s3://`` prefix)
    for data files that :func:`commit_files` will move into the table; stale ones are deleted
    first (:func:`clean_stale_staging`)."""
    clean_stale_staging(path, storage=storage)
    staging = join(path, STAGING_DIR, uuid.uuid4().hex)
    for attempt in range(0 if is_remote(path) else 3):  # an object store has no folders to make
        try:
            os.makedirs(local_path(staging), exist_ok=True)
            break
        except FileNotFoundError:  # a discard removed the empty ``_staging`` meanwhile
            if attempt == 2:
                raise
    return staging


STALE_STAGING_S = 24 * 3600


def clean_stale_staging(path: str, max_age_s: float = STALE_STAGING_S, storage: StorageConfig | None = None) -> list[str]:
    """Delete staging folders of the table ``path`` whose files were all last modified more
    than ``max_age_s`` seconds ago: left by a driver killed before its commit (never part of
    the table). Younger ones may belong to a run in progress and are kept. Returns the folders
    deleted."""
    import time

    import pyarrow.fs as pafs

    fs, parent = filesystem(join(path, STAGING_DIR), storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, recursive=True, allow_not_found=True))
    except FileNotFoundError:  # a discard removed it meanwhile
        return []
    newest: dict[str, float] = {}
    for info in infos:
        name = info.path[len(parent):].lstrip("/").split("/", 1)[0]
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        newest[name] = max(newest.get(name, 0.0), mtime)
    gone = []
    for name, mtime in newest.items():
        if time.time() - mtime > max_age_s:
            d = join(path, STAGING_DIR, name)
            remove_tree(d, storage)
            gone.append(d)
    return gone


def discard_staging(staging: str, storage: StorageConfig | None = None) -> None:
    """Delete a staging folder and whatever it holds (files of failed or superseded task
    attempts included), and a local ``_staging`` parent when that is left empty. Storage that
    cannot be reached (a run failing because of it) leaves the staged files, logged: a later
    run's :func:`clean_stale_staging` removes them."""
    try:
        remove_tree(staging, storage)
    except OSError as exc:
        logging.getLogger(__name__).warning("staged files left at %s (a later run removes them): %s", staging, exc)
        return
    if is_remote(staging):
        return
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
    storage: StorageConfig | None = None,
) -> WriteResult:
    """Move exactly ``files`` from ``staging`` into the table at ``path`` and commit them to
    the Delta log with delta-rs in **one** commit.

    Only the listed files are committed: files a failed or superseded task attempt left in
    ``staging`` are not, so a retried task never duplicates rows. The caller discards
    ``staging`` afterwards (:func:`discard_staging`), also on failure; files moved but never
    committed are invisible to every Delta reader.

    Args:
        path: table folder or ``s3://`` URI (created with the first commit).
        staging: folder (or prefix) from :func:`new_staging`.
        files: ``(relative path under staging, rows)``; Hive-style ``key=value`` folders give
            the partition values.
        schema: the table's Spark schema (partition columns included).
        mode, partition_by, replace_partitions: as for :meth:`slidelake.lake.Lake.write_frame`.
        storage: how an ``s3://`` table is reached.

    Raises:
        FileExistsError: a data file of that name already exists in the table.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    fs, table = filesystem(path, storage)
    _, staged = filesystem(staging, storage)
    partition_by = partition_by or []

    def move(item: tuple[str, int]) -> AddAction:
        rel, n = item
        dst = f"{table}/{rel}"
        if fs.get_file_info(dst).type != pafs.FileType.NotFound:  # names carry a UUID; never clobber a file
            raise FileExistsError(f"refusing to overwrite existing data file {dst}")
        if not is_remote(path):
            fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        fs.move(f"{staged}/{rel}", dst)  # a rename; on object storage a copy inside the store
        info = fs.get_file_info(dst)
        return AddAction(path=rel, size=info.size, partition_values=_partition_values(rel, partition_by),
                         modification_time=int(info.mtime.timestamp() * 1000), data_change=True,
                         stats=json.dumps({"numRecords": int(n)}))

    with ThreadPoolExecutor(max_workers=8 if is_remote(path) else 1) as pool:
        adds = list(pool.map(move, sorted(files)))
    total = sum(int(n) for _, n in files)
    opts = delta_options(storage)
    uri = delta_uri(path) if is_remote(path) else table
    dschema = Schema.from_json(nullable(schema).json())

    def commit() -> None:
        if not table_exists(uri, storage):
            create_table_with_add_actions(uri, dschema, adds, mode="error", partition_by=partition_by or None,
                                          storage_options=opts)
            return
        dt = DeltaTable(uri, storage_options=opts)
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
    return WriteResult(DeltaTable(uri, storage_options=opts).version(), len(adds), total,
                       rows_by_partition(files, partition_by))


# Spark's Delta writer's commit conflicts (io.delta.exceptions), by name in the error text
SPARK_CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
                   "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException",
                   "ProtocolChangedException", "DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED")


def _is_conflict(exc: BaseException) -> bool:
    from deltalake.exceptions import CommitFailedError, DeltaError

    if isinstance(exc, CommitFailedError):
        return True
    msg = str(exc)
    if any(name in msg for name in SPARK_CONFLICTS):
        return True
    low = msg.lower()
    return isinstance(exc, (DeltaError, OSError)) and any(
        w in low for w in ("already exists", "version", "conflict", "concurrent"))


def retry_on_conflict(commit, attempts: int = 8) -> None:
    """Run a Delta ``commit()`` (delta-rs, or a write of Spark's Delta writer); when another
    writer committed first (a Delta commit conflict, or two runs creating the same table at
    once), try again with a fresh snapshot after a short
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


def arrow_schema(schema: T.StructType):
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(nullable(schema), timezone="UTC")


def maps_to_dicts(rows: list[dict], schema: T.StructType) -> list[dict]:
    """pyarrow gives map columns as lists of (key, value) tuples; make them dicts."""
    maps = [f.name for f in schema.fields if isinstance(f.dataType, T.MapType)]
    for r in rows:
        for m in maps:
            if r.get(m) is not None:
                r[m] = dict(r[m])
    return rows
