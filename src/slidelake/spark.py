"""The one place that builds (or finds) the SparkSession.

* Inside ``spark-submit``, Databricks or a notebook with a session: the existing session is
  used, never a second one; the cluster's master and settings are left alone.
* From plain Python (tests, the CLI on a laptop): an embedded ``local[*]`` session is started
  (``SLIDELAKE_SPARK_MASTER`` overrides the master, e.g. ``local-cluster[2,1,1024]``).

In both cases the runtime SQL settings slidelake relies on are applied: Arrow for pandas UDFs,
microsecond Parquet timestamps (not INT96, which delta-rs and polars read differently), UTC.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

RUNTIME_CONF: dict[str, str] = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
}

LOCAL_CONF: dict[str, str] = {
    "spark.driver.memory": "4g",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.enabled": "false",
    "spark.python.worker.reuse": "true",
}


def _under_cluster_launcher() -> bool:
    """True under spark-submit/pyspark shell (the JVM was launched for us)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "DATABRICKS_RUNTIME_VERSION" in os.environ


def get_spark(app_name: str = "slidelake", master: str | None = None) -> SparkSession:
    """Return the active SparkSession, or start an embedded local one.

    Args:
        app_name: application name for a new session.
        master: master URL for a new local session; default ``$SLIDELAKE_SPARK_MASTER`` or
            ``local[*]``. Ignored when a session already exists or under spark-submit.

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
            for k, v in LOCAL_CONF.items():
                builder = builder.config(k, v)
            # Delta jars supplied with --packages/--jars locally: enable its SQL extension too
            if os.environ.get("SLIDELAKE_DELTA_EXTENSIONS") == "1":
                builder = builder.config(
                    "spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension"
                ).config(
                    "spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"
                )
        spark = builder.getOrCreate()
        if not _under_cluster_launcher():
            spark.sparkContext.setLogLevel(os.environ.get("SLIDELAKE_SPARK_LOG_LEVEL", "ERROR"))
    for k, v in RUNTIME_CONF.items():
        try:
            spark.conf.set(k, v)
        except Exception:  # noqa: BLE001 - some managed runtimes pin a setting; keep theirs
            pass
    return spark


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
