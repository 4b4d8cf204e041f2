"""SQL over a lake's tables, for ``slidelake sql``: without Spark, on a local lake or one in an
S3 bucket, or with Spark SQL.

Engines: ``datafusion`` is Apache DataFusion inside delta-rs (``deltalake.QueryBuilder``): it
reads the Delta logs itself, from a folder or a bucket (``s3://``, ``s3a://``, keys and endpoint
from the standard ``AWS_*`` environment variables), and answers in about a second; ``spark``
registers each table as a temporary view of the session's reader (its own storage settings). Both take the same queries for what slidelake's tables hold (``SELECT``,
``GROUP BY``, joins, ``attributes['key']`` on maps); a result is an Arrow table either way.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

if TYPE_CHECKING:
    from slidelake.lake import Lake

class QueryError(ValueError):
    """A query the engine refused (unknown table or column, syntax): its first line."""


def present_tables(lake: Lake) -> list[str]:
    """The slidelake tables ``lake`` holds (a Delta log at their location), locally or in a
    bucket.

    Raises:
        QueryError: the storage refused the listing (wrong credentials, no such bucket, no
            server), in one line that names the lake and no secret.
    """
    from slidelake.lake import TABLES
    from slidelake.storage import storage_reason

    try:
        return [name for name in TABLES if lake.exists(name)]
    except OSError as exc:
        raise QueryError(f"cannot read {lake.root}: {storage_reason(exc)} (credentials and endpoint come from "
                         "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL)") from exc


def run_query(query: str, lake: Lake, tables: list[str], engine: Literal["datafusion", "spark"],
              limit: int) -> pa.Table:
    """The first ``limit`` rows of ``query`` over ``tables`` of ``lake`` (each a view by its
    name: ``slides``, ``tiles``, ...).

    Raises:
        QueryError: the engine refused the query (its first line).
    """
    if engine == "datafusion":
        from deltalake import QueryBuilder

        qb = QueryBuilder()
        for name in tables:
            qb.register(name, lake.delta_table(name))
        try:
            batches, n = [], 0
            for batch in qb.execute(query):  # stops reading at the limit
                batches.append(pa.record_batch(batch))
                n += batches[-1].num_rows
                if n >= limit:
                    break
            if not batches:  # no row: the result's columns still come from the plan
                return pa.table(qb.execute(query).read_all())
        except Exception as exc:  # noqa: BLE001 - DeltaError, DataFusion's plan and parse errors
            raise QueryError(_first_line(exc)) from exc
        return pa.Table.from_batches(batches).slice(0, limit)
    from slidelake.lake import TABLES, choose_writer
    from slidelake.spark import get_spark

    spark = get_spark()
    with_spark = replace(lake, spark=spark, writer=choose_writer(spark))
    for name in TABLES:  # a view of another lake read earlier in this session must not answer
        if name in tables:
            with_spark.read(name).createOrReplaceTempView(name)
        else:
            spark.catalog.dropTempView(name)
    try:
        return spark.sql(query).limit(limit).toArrow()
    except Exception as exc:  # noqa: BLE001 - AnalysisException, ParseException
        raise QueryError(_first_line(exc)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plain_rows(table: pa.Table) -> tuple[list[str], list[list[Any]]]:
    """``(column names, rows)`` of a result without its binary columns (tile bytes), nested
    values as Python lists and dicts (a map as a dict)."""
    cols = [f.name for f in table.schema if not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)
            and not pa.types.is_binary_view(f.type)]
    rows = [[_plain(r[c]) for c in cols] for r in table.select(cols).to_pylist()]
    return cols, rows


def _plain(v: Any) -> Any:
    if isinstance(v, list) and v and all(isinstance(e, tuple) and len(e) == 2 for e in v):
        return {k: _plain(x) for k, x in v}  # an Arrow map
    if isinstance(v, list):
        return [_plain(e) for e in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def cell_text(v: Any) -> str:
    """A value as text: nested values as JSON, timestamps ISO 8601, null as empty."""
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return str(v)


def to_csv(cols: list[str], rows: list[list[Any]]) -> str:
    """CSV with a header; nested values as JSON, timestamps ISO 8601, nulls empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows([[cell_text(v) for v in r] for r in rows])
    return buf.getvalue()


def to_json(cols: list[str], rows: list[list[Any]]) -> str:
    """One JSON array of row objects (timestamps ISO 8601)."""
    return json.dumps([dict(zip(cols, r)) for r in rows], default=cell_text, indent=None)


__all__ = ["QueryError", "present_tables", "run_query", "plain_rows", "cell_text", "to_csv", "to_json"]
