"""The one place that builds (or finds) the SparkSession.

* Inside ``spark-submit``, Databricks or a notebook with a session: the existing session is
  used, never a second one; the cluster's master and settings are left alone.
* From plain Python (tests, the CLI on a laptop): an embedded ``local[*]`` session is started
  (``SLIDELAKE_SPARK_MASTER`` overrides the master, e.g. ``local-cluster[2,1,1024]``). Its JVM
  compiles with the client JIT only and collects with the parallel collector
  (:data:`LOCAL_JVM_OPTIONS`; ``SLIDELAKE_JVM_OPTIONS`` replaces them, an empty value keeps the
  JVM's defaults).

In both cases the runtime SQL settings slidelake relies on are applied: Arrow for pandas UDFs,
microsecond Parquet timestamps (not INT96, which delta-rs and polars read differently), UTC.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from pyspark.sql import SparkSession

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import StructType

RUNTIME_CONF: dict[str, str] = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
}

# The embedded session's JVM does little compute (the pixels stay in the Python workers), and its
# first jobs are dominated by class loading and JIT compilation, which compete with the workers
# for the same few cores. The client (C1) compiler alone: a first run of the benchmark slide took
# 18-25 s instead of 27-29 s and later runs were no slower (JVM-heavy grid expansion alone runs
# at 1.7-3.3 instead of 5.5-9.9 million rows/s). The parallel collector instead of G1, whose
# concurrent threads take CPU beside the workers: on a folder of four slides the JVM used 1.30
# instead of 1.47 s of CPU per warm run (4.20 instead of 4.44 s wall; medians of 12 alternated
# runs). HotSpot options: https://docs.oracle.com/en/java/javase/17/docs/specs/man/java.html
LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC"

LOCAL_CONF: dict[str, str] = {
    "spark.driver.memory": "4g",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.enabled": "false",
    "spark.python.worker.reuse": "true",
    # Spark's Delta writer rebuilds a table's log state with this many tasks after each commit
    # (default 50, sized for clusters): on a local session each such stage took ~2 s, with 2 about 0.1 s
    "spark.databricks.delta.snapshotPartitions": "2",
}


def _under_cluster_launcher() -> bool:
    """True under spark-submit/pyspark shell (the JVM was launched for us)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "DATABRICKS_RUNTIME_VERSION" in os.environ


# errors only, to stderr (src/slidelake/log4j2.properties): no Spark start-up lines on a CLI run
LOG4J_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")


def local_conf() -> dict[str, str]:
    """Settings of a new embedded local session: :data:`LOCAL_CONF`, and
    ``spark.driver.extraJavaOptions`` = ``$SLIDELAKE_JVM_OPTIONS`` (default
    :data:`LOCAL_JVM_OPTIONS`; an empty value sets none, keeping the JVM's defaults) plus the
    log settings :data:`LOG4J_CONF` unless ``SLIDELAKE_VERBOSE=1`` (Spark's own then)."""
    conf = dict(LOCAL_CONF)
    jvm_options = os.environ.get("SLIDELAKE_JVM_OPTIONS", LOCAL_JVM_OPTIONS).strip()
    if os.environ.get("SLIDELAKE_VERBOSE", "0").strip() in ("", "0"):
        jvm_options = f"{jvm_options} -Dlog4j2.configurationFile=file:{LOG4J_CONF}".strip()
    if jvm_options:
        conf["spark.driver.extraJavaOptions"] = jvm_options
    return conf


DELTA_CONF: dict[str, str] = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


# Hadoop's S3A for pyspark's Hadoop 3.5.0 (jobs/fetch_jars.sh s3)
S3A_JARS = ("hadoop-aws-*.jar", "bundle-*.jar", "analyticsaccelerator-s3-*.jar")


def delta_jar_conf() -> dict[str, str]:
    """Settings that put Spark's Delta Lake writer in a new embedded session, as Databricks and
    EMR have it: ``spark.jars`` = the ``delta-spark_*.jar`` and ``delta-storage-*.jar`` in the
    folder ``$SLIDELAKE_DELTA_JARS`` (``jobs/fetch_jars.sh`` fills it) and :data:`DELTA_CONF`;
    empty when the variable is unset (the delta-rs writer is then used). Hadoop's S3A jars in
    the same folder (``jobs/fetch_jars.sh s3``: hadoop-aws, the AWS SDK bundle, the S3 analytics
    accelerator) go on the driver's and the executors' class paths (this machine's paths, no
    copy of the 690 MB bundle per executor), for ``s3a://`` lakes.

    Raises:
        FileNotFoundError: ``$SLIDELAKE_DELTA_JARS`` is set but holds no Delta jars.
    """
    folder = os.environ.get("SLIDELAKE_DELTA_JARS", "").strip()
    if not folder:
        return {}
    import glob

    jars = sorted(glob.glob(os.path.join(folder, "delta-spark_*.jar")) + glob.glob(os.path.join(folder, "delta-storage-*.jar")))
    if len(jars) < 2:
        raise FileNotFoundError(f"SLIDELAKE_DELTA_JARS={folder}: no delta-spark and delta-storage jars there "
                                "(run jobs/fetch_jars.sh, or unset it to use the delta-rs writer)")
    conf = {"spark.jars": ",".join(jars), **DELTA_CONF}
    s3a = [j for name in S3A_JARS for j in sorted(glob.glob(os.path.join(folder, name)))]
    if len(s3a) == len(S3A_JARS):
        conf["spark.driver.extraClassPath"] = conf["spark.executor.extraClassPath"] = ":".join(s3a)
    return conf


def get_spark(app_name: str = "slidelake", master: str | None = None) -> SparkSession:
    """Return the active SparkSession, or start an embedded local one.

    Args:
        app_name: application name for a new session.
        master: master URL for a new local session; default ``$SLIDELAKE_SPARK_MASTER`` or
            ``local[*]``. Ignored when a session already exists or under spark-submit.

    A new local session gets :func:`local_conf` (its JVM options included) and
    :func:`delta_jar_conf` (Spark's Delta writer when ``$SLIDELAKE_DELTA_JARS`` is set), and starts its
    Python workers in the background (:func:`warm_up`; ``SLIDELAKE_WARM_UP=0`` turns it off).

    Returns:
        The session, with :data:`RUNTIME_CONF` applied.
    """
    spark = SparkSession.getActiveSession()
    if spark is None:
        builder = SparkSession.builder.appName(app_name)
        if not _under_cluster_launcher():
            # workers must run this interpreter (the one slidelake is installed in)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            builder = builder.master(master or os.environ.get("SLIDELAKE_SPARK_MASTER", "local[*]"))
            for k, v in local_conf().items():
                builder = builder.config(k, v)
            for k, v in delta_jar_conf().items():
                builder = builder.config(k, v)
        if _under_cluster_launcher() or os.environ.get("SLIDELAKE_VERBOSE", "0").strip() not in ("", "0"):
            spark = builder.getOrCreate()
        else:
            with _jvm_stderr_without(JVM_NOTES):
                spark = builder.getOrCreate()
        if not _under_cluster_launcher():
            spark.sparkContext.setLogLevel(os.environ.get("SLIDELAKE_SPARK_LOG_LEVEL", "ERROR"))
            if os.environ.get("SLIDELAKE_WARM_UP", "1").strip() != "0":
                warm_up(spark)
    for k, v in RUNTIME_CONF.items():
        try:
            spark.conf.set(k, v)
        except Exception:  # noqa: BLE001 - some managed runtimes pin a setting; keep theirs
            pass
    return spark


# what the JVM itself prints on every start (Spark 4 adds --add-modules=jdk.incubator.vector)
JVM_NOTES = ("WARNING: Using incubator modules",)


@contextmanager
def _jvm_stderr_without(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Start the JVM in the block with its standard error going through a pipe to ours, less
    the lines starting with ``prefixes`` (the JVM inherits file descriptor 2 when it starts; a
    daemon thread forwards every other line for the JVM's lifetime)."""
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        os.dup2(saved, 2)  # this process's own stderr again; the JVM keeps the pipe

    def forward() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not line.decode(errors="replace").startswith(prefixes):
                    os.write(saved, line)

    threading.Thread(target=forward, name="slidelake-jvm-stderr", daemon=True).start()


WARM_UP_GROUP = "slidelake-warm-up"
# modules the pipeline's stages run in the Python workers (imported by name: the worker is
# another process, so this module does not depend on them)
WORKER_MODULES = ("slidelake.decode", "slidelake.overlap", "slidelake.write")


def _warm_worker(batches):
    """``mapInArrow`` function of :func:`warm_up`: import :data:`WORKER_MODULES` in the Python
    worker and pass the rows through."""
    from importlib import import_module

    for name in WORKER_MODULES:
        import_module(name)
    yield from batches


def warm_up(spark: SparkSession, group: str = WARM_UP_GROUP) -> threading.Thread:
    """Start, in a daemon thread, one small job that pays a new local session's one-off Python
    costs while the driver discovers slides and makes masks: a Python worker per core started
    and the pipeline's modules imported in it (the workers are then reused,
    ``spark.python.worker.reuse``). The job reads and writes nothing and runs in the Spark job
    group ``group``; any failure is ignored (the first real job then pays the costs itself).
    The first run of a session is ~15 % faster on the benchmark slide (docs/benchmarks.md).

    Returns:
        The started thread.
    """
    def run() -> None:
        try:
            spark.sparkContext.setJobGroup(group, "warm-up: start the Python workers")
            n = spark.sparkContext.defaultParallelism
            df = spark.range(0, n, numPartitions=n)
            df.mapInArrow(_warm_worker, df.schema).collect()
        except Exception:  # noqa: BLE001 - an optimisation only
            pass

    t = threading.Thread(target=run, name="slidelake-warm-up", daemon=True)
    t.start()
    return t


def local_frame(spark: SparkSession, rows: list[tuple] | list[dict], schema: "StructType") -> "DataFrame":
    """A DataFrame of a few rows made on the driver, held in the query plan itself.

    ``spark.createDataFrame`` on a Python list makes a Python RDD: every task that reads it
    first starts a Python worker to unpickle the rows, and a broadcast of it is a Spark job of
    its own (~0.1 s of a warm run, ``docs/benchmarks.md``). Built from an Arrow table it is a
    ``LocalRelation`` instead: Spark reads it without a job or a Python worker, and spreads it
    over ``min(rows, defaultParallelism)`` tasks where a plan needs partitions.

    Args:
        spark: the session.
        rows: tuples in ``schema``'s field order, or dicts by field name.
        schema: the Spark schema (timestamps are taken as UTC).

    Raises:
        pyarrow.ArrowInvalid / ArrowTypeError: a value does not fit its field's type.
    """
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    names = schema.fieldNames()
    dicts = [r if isinstance(r, dict) else dict(zip(names, r)) for r in rows]
    table = pa.Table.from_pylist(dicts, schema=to_arrow_schema(schema, timezone="UTC"))
    return spark.createDataFrame(table, schema=schema)


def delta_jars_available(spark: SparkSession) -> bool:
    """True when Spark's own Delta Lake data source is on the classpath.

    On Spark Connect (Databricks serverless) there is no JVM handle; Delta is assumed present.
    """
    try:
        jvm = spark._jvm  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return True
    if jvm is None:
        return True
    try:
        loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
        loader.loadClass("org.apache.spark.sql.delta.DeltaLog")
        return True
    except Exception:  # noqa: BLE001 - Py4JJavaError: ClassNotFoundException
        return False
