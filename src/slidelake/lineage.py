"""Lineage: run ids, versions, and the ``runs`` table row describing what a run did."""

from __future__ import annotations

import platform
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Iterator

from pyspark.accumulators import AccumulatorParam

from slidelake import __version__
from slidelake.rows import RunRow, RunSlideRow, SlideCount, SlideError, SlideRow, TileErrorRow, spark_schema

SLIDE_COUNT = spark_schema(SlideCount, all_nullable=True)
SLIDE_ERROR = spark_schema(SlideError, all_nullable=True)
TILE_ERRORS_SCHEMA = spark_schema(TileErrorRow, all_nullable=True)  # appended; filter by run_id
RUN_SLIDES_SCHEMA = spark_schema(RunSlideRow, all_nullable=True)  # appended after each commit
RUNS_SCHEMA = spark_schema(RunRow, all_nullable=True)


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
    slide_counts: list[SlideCount] = field(default_factory=list)
    slide_errors: list[SlideError] = field(default_factory=list)
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

    def slide_error(self, slide: SlideRow, stage: str, message: str) -> None:
        """Record one slide's failure at ``stage`` (a ``runs.slide_errors`` entry)."""
        self.slide_errors.append({"slide_id": slide.get("slide_id"), "path": slide.get("path"), "stage": stage,
                                  "error": message})

    def row(self) -> RunRow:
        """The record as a dict matching :data:`RUNS_SCHEMA`: each :class:`RunRow` column from the
        attribute of that name, else from :attr:`counts` (null when the run did not count it)."""
        ended = utcnow()
        now = {"ended_at": ended, "duration_s": (ended - self.started_at).total_seconds(), "inputs": list(self.inputs)}
        return {k: now[k] if k in now else getattr(self, k) if k in self.__dataclass_fields__ else self.counts.get(k)
                for k in RunRow.__annotations__}  # type: ignore[return-value]
