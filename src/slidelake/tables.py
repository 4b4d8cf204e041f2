"""What the ``delta-rs`` writer does underneath :class:`slidelake.lake.Lake`, and the stored
form of slide paths.

Parquet files are written into ``<table>/_staging/<uuid>/`` (by Spark, or for the tiles by the
Python workers themselves, :mod:`slidelake.write`); exactly the files of the successful task
attempts are moved next to the table's data and committed to the Delta log by delta-rs in
**one** commit (:func:`commit_files`). A failure before the commit leaves the table as it was
(staged files are deleted, :func:`discard_staging`; files never committed are invisible to
every Delta reader). Reads list the log's active files only, never the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

from pyspark.sql import types as T


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


def table_exists(path: str) -> bool:
    """True when ``path`` holds a Delta log."""
    return os.path.isdir(os.path.join(path, "_delta_log")) and any(
        f.endswith(".json") or f.endswith(".checkpoint.parquet")
        for f in os.listdir(os.path.join(path, "_delta_log"))
    )


def local_path(path: str) -> str:
    if "://" in path and not path.startswith("file://"):
        raise ValueError(
            f"{path}: the delta-rs writer supports local lake roots only; on object storage "
            "use Spark's Delta writer (Delta jars on the classpath)"
        )
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


def new_staging(path: str) -> str:
    """Create and return a fresh staging folder ``<table>/_staging/<uuid>/`` for data files
    that :func:`commit_files` will move into the table. Local paths only.

    Raises:
        ValueError: ``path`` is a remote URI (the delta-rs writer is local only).
    """
    local = local_path(path)
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

    local = local_path(path)
    partition_by = partition_by or []
    adds: list[AddAction] = []
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

    dschema = Schema.from_json(nullable(schema).json())

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
    return WriteResult(DeltaTable(local).version(), len(adds), total, rows_by_partition(files, partition_by))


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
