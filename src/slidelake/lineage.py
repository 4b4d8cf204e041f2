"""Lineage: run ids, versions, and the ``runs`` table row describing what a run did."""

from __future__ import annotations

import platform
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Iterator

from pyspark.accumulators import AccumulatorParam
from pyspark.sql import types as T

from slidelake import __version__

SLIDE_COUNT = T.StructType([
    T.StructField("slide_id", T.StringType()),
    T.StructField("path", T.StringType()),
    T.StructField("level", T.IntegerType()),
    T.StructField("mpp_x", T.DoubleType()),
    T.StructField("tiles_generated", T.LongType()),
    T.StructField("tiles_skipped", T.LongType()),
    T.StructField("tiles_decoded", T.LongType()),
    T.StructField("tiles_failed", T.LongType()),
    T.StructField("tiles_filtered", T.LongType()),
    T.StructField("tiles_written", T.LongType()),
])

SLIDE_ERROR = T.StructType([
    T.StructField("slide_id", T.StringType()),
    T.StructField("path", T.StringType()),
    T.StructField("stage", T.StringType()),
    T.StructField("error", T.StringType()),
])

# <lake>/tile_errors: one row per tile that failed in a run (appended; filter by run_id)
TILE_ERRORS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("slide_id", T.StringType()),
    T.StructField("path", T.StringType()),
    T.StructField("config_hash", T.StringType()),
    T.StructField("level", T.IntegerType()),
    T.StructField("tile_x", T.LongType()),
    T.StructField("tile_y", T.LongType()),
    T.StructField("stage", T.StringType()),
    T.StructField("error", T.StringType()),
    T.StructField("created_at", T.TimestampType()),
])

# <lake>/run_slides: one row per slide a run committed tiles for (appended after each commit);
# the record incremental runs skip by
RUN_SLIDES_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("slide_id", T.StringType()),
    T.StructField("path", T.StringType()),
    T.StructField("fingerprint", T.StringType()),
    T.StructField("config_hash", T.StringType()),
    T.StructField("tiles_table", T.StringType()),
    T.StructField("tiles_version", T.LongType()),
    T.StructField("replaced_table", T.BooleanType()),
    T.StructField("tiles_generated", T.LongType()),
    T.StructField("tiles_written", T.LongType()),
    T.StructField("tiles_failed", T.LongType()),
    T.StructField("created_at", T.TimestampType()),
])

RUNS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("job", T.StringType()),
    T.StructField("status", T.StringType()),
    T.StructField("error", T.StringType()),
    T.StructField("started_at", T.TimestampType()),
    T.StructField("ended_at", T.TimestampType()),
    T.StructField("duration_s", T.DoubleType()),
    T.StructField("inputs", T.ArrayType(T.StringType())),
    T.StructField("lake", T.StringType()),
    T.StructField("config", T.StringType()),
    T.StructField("config_hash", T.StringType()),
    T.StructField("versions", T.MapType(T.StringType(), T.StringType())),
    T.StructField("delta_writer", T.StringType()),
    T.StructField("spark_master", T.StringType()),
    T.StructField("slides_discovered", T.LongType()),
    T.StructField("slides_ok", T.LongType()),
    T.StructField("slides_error", T.LongType()),
    T.StructField("slides_unchanged", T.LongType()),
    T.StructField("slides_tiled", T.LongType()),
    T.StructField("slides_skipped", T.LongType()),
    T.StructField("masks_computed", T.LongType()),
    T.StructField("masks_reused", T.LongType()),
    T.StructField("masks_failed", T.LongType()),
    T.StructField("tiles_generated", T.LongType()),
    T.StructField("tiles_skipped", T.LongType()),
    T.StructField("tiles_decoded", T.LongType()),
    T.StructField("tiles_failed", T.LongType()),
    T.StructField("tiles_filtered", T.LongType()),
    T.StructField("tiles_written", T.LongType()),
    T.StructField("table_versions", T.MapType(T.StringType(), T.LongType())),
    T.StructField("slide_counts", T.ArrayType(SLIDE_COUNT)),
    T.StructField("slide_errors", T.ArrayType(SLIDE_ERROR)),
    T.StructField("stage_seconds", T.MapType(T.StringType(), T.DoubleType())),
    T.StructField("profile", T.MapType(T.StringType(), T.DoubleType())),
])


def new_run_id() -> str:
    """A sortable run id: UTC timestamp plus 8 random hex digits, e.g. ``20261121T101500Z-1a2b3c4d``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def utcnow() -> datetime:
    """Naive UTC now (Spark timestamps are written as UTC)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def versions(spark_version: str | None = None) -> dict[str, str]:
    """Versions that affect results: slidelake, Spark, delta-rs, OpenSlide, codecs, Python."""
    out = {
        "slidelake": __version__,
        "python": platform.python_version(),
        "deltalake": _version("deltalake"),
        "openslide-python": _version("openslide-python"),
        "openslide-bin": _version("openslide-bin"),
        "imagecodecs": _version("imagecodecs"),
        "pillow": _version("pillow"),
        "numpy": _version("numpy"),
    }
    try:
        import openslide

        out["openslide"] = openslide.__library_version__
    except Exception:  # noqa: BLE001
        pass
    if spark_version:
        out["spark"] = spark_version
    return out


class SumLog(AccumulatorParam):
    """Spark accumulator of named sums ``{name: float}`` (``--profile`` timings and counts, tiles
    decoded per slide for the live progress); names ending in ``_peak_mib`` (a worker's peak
    memory) keep the largest value instead. Like every accumulator updated in a transformation,
    a retried task can add twice: the run's counts come from the task results."""

    def zero(self, value: dict[str, float]) -> dict[str, float]:
        return {}

    def addInPlace(self, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        for k, v in b.items():
            a[k] = max(a.get(k, 0.0), v) if k.endswith("_peak_mib") else a.get(k, 0.0) + v
        return a


@dataclass
class RunRecord:
    """The ``runs`` row being built during a run (see :data:`RUNS_SCHEMA`)."""

    job: str
    lake: str
    config: str
    config_hash: str
    inputs: list[str]
    run_id: str = field(default_factory=new_run_id)
    started_at: datetime = field(default_factory=utcnow)
    status: str = "running"
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    delta_writer: str | None = None
    spark_master: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    table_versions: dict[str, int] = field(default_factory=dict)
    slide_counts: list[dict[str, Any]] = field(default_factory=list)
    slide_errors: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    profile: dict[str, float] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a pipeline stage into :attr:`stage_seconds` (summed over repeats) and name the
        Spark jobs it starts after it (their description in the Spark UI)."""
        from pyspark.sql import SparkSession

        t = time.perf_counter()
        active = SparkSession.getActiveSession()
        if active is not None:
            active.sparkContext.setJobDescription(name)
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t

    def slide_error(self, slide: dict[str, Any], stage: str, message: str) -> None:
        """Record one slide's failure at ``stage`` (a ``runs.slide_errors`` entry)."""
        self.slide_errors.append({"slide_id": slide.get("slide_id"), "path": slide.get("path"), "stage": stage,
                                  "error": message})

    def row(self) -> dict[str, Any]:
        """The record as a dict matching :data:`RUNS_SCHEMA`."""
        ended = utcnow()
        keys = ("slides_discovered", "slides_ok", "slides_error", "slides_unchanged", "slides_tiled",
                "slides_skipped", "masks_computed",
                "masks_reused", "masks_failed", "tiles_generated", "tiles_skipped", "tiles_decoded",
                "tiles_failed", "tiles_filtered", "tiles_written")
        return {
            "run_id": self.run_id, "job": self.job, "status": self.status, "error": self.error,
            "started_at": self.started_at, "ended_at": ended,
            "duration_s": (ended - self.started_at).total_seconds(),
            "inputs": list(self.inputs), "lake": self.lake, "config": self.config,
            "config_hash": self.config_hash, "versions": self.versions,
            "delta_writer": self.delta_writer, "spark_master": self.spark_master,
            **{k: self.counts.get(k) for k in keys},
            "table_versions": self.table_versions, "slide_counts": self.slide_counts,
            "slide_errors": self.slide_errors, "stage_seconds": self.stage_seconds, "profile": self.profile,
        }
