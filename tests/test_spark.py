"""The embedded local session's settings."""

import os

import pytest

from slidelake.spark import LOCAL_CONF, LOCAL_JVM_OPTIONS, LOG4J_CONF, local_conf


def test_local_conf_jvm_options_default_override_and_off(monkeypatch):
    """``SLIDELAKE_JVM_OPTIONS`` replaces the JVM options (empty: none); the log settings
    (errors only) are added unless ``SLIDELAKE_VERBOSE=1``."""
    log = f"-Dlog4j2.configurationFile=file:{LOG4J_CONF}"
    monkeypatch.delenv("SLIDELAKE_JVM_OPTIONS", raising=False)
    monkeypatch.delenv("SLIDELAKE_VERBOSE", raising=False)
    conf = local_conf()
    assert LOCAL_JVM_OPTIONS == "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC"
    assert conf["spark.driver.extraJavaOptions"] == f"{LOCAL_JVM_OPTIONS} {log}"
    assert {k: conf[k] for k in LOCAL_CONF} == LOCAL_CONF
    assert os.path.isfile(LOG4J_CONF)

    monkeypatch.setenv("SLIDELAKE_JVM_OPTIONS", "-XX:+UseSerialGC -Xss4m")
    assert local_conf()["spark.driver.extraJavaOptions"] == f"-XX:+UseSerialGC -Xss4m {log}"

    monkeypatch.setenv("SLIDELAKE_JVM_OPTIONS", " ")
    assert local_conf()["spark.driver.extraJavaOptions"] == log
    monkeypatch.setenv("SLIDELAKE_VERBOSE", "1")
    assert "spark.driver.extraJavaOptions" not in local_conf()
    monkeypatch.delenv("SLIDELAKE_JVM_OPTIONS")
    assert local_conf()["spark.driver.extraJavaOptions"] == LOCAL_JVM_OPTIONS


@pytest.mark.spark
def test_embedded_session_jvm_runs_with_the_options(spark):
    expected = os.environ.get("SLIDELAKE_JVM_OPTIONS", LOCAL_JVM_OPTIONS).split()
    args = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert expected and all(opt in args for opt in expected), args
    assert f"-Dlog4j2.configurationFile=file:{LOG4J_CONF}" in args  # the test session is not verbose
    assert spark.conf.get("spark.driver.extraJavaOptions") == " ".join(
        [*expected, f"-Dlog4j2.configurationFile=file:{LOG4J_CONF}"])
    if "-XX:+UseParallelGC" in expected:  # the default: the parallel collector's two generations
        beans = spark._jvm.java.lang.management.ManagementFactory.getGarbageCollectorMXBeans()
        assert sorted(b.getName() for b in beans) == ["PS MarkSweep", "PS Scavenge"]


@pytest.mark.spark
def test_warm_up_runs_one_job_in_its_group_and_returns(spark):
    from slidelake.spark import warm_up

    tracker = spark.sparkContext.statusTracker()
    warm_up(spark, group="test-warm-up").join(120)
    (job,) = tracker.getJobIdsForGroup("test-warm-up")
    assert tracker.getJobInfo(job).status == "SUCCEEDED"
    # the calling thread's own job group is untouched (Spark's local properties are per thread)
    assert spark.sparkContext.getLocalProperty("spark.jobGroup.id") != "test-warm-up"


def test_warm_up_worker_imports_the_pipeline_and_passes_rows_through():
    import sys

    import pyarrow as pa

    from slidelake.spark import _warm_worker

    batch = pa.RecordBatch.from_pydict({"id": [0, 1]})
    assert list(_warm_worker(iter([batch]))) == [batch]
    assert {"slidelake.decode", "slidelake.overlap", "slidelake.write"} <= set(sys.modules)


def test_warm_up_ignores_a_failure(monkeypatch):
    import threading

    from slidelake.spark import warm_up

    raised = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

    class Broken:
        @property
        def sparkContext(self):
            raise RuntimeError("no session")

    t = warm_up(Broken())
    t.join(10)
    assert not t.is_alive() and raised == []


def test_local_frame_keeps_the_rows_and_types_in_the_plan(spark):
    """Driver-side rows become a LocalRelation (no Python RDD, so no job or Python worker to
    read them), with nulls, maps and timestamps as given."""
    import datetime as dt

    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from slidelake.spark import local_frame

    schema = T.StructType.fromDDL("slide_id string, level int, mpp double, attributes map<string,string>, "
                                  "discovered_at timestamp")
    when = dt.datetime(2026, 11, 22, 18, 30, tzinfo=dt.timezone.utc)
    rows = [("a", 0, 0.25, {"stain": "HE"}, when), {"slide_id": "b", "level": 2, "mpp": None, "attributes": None,
                                                    "discovered_at": None}]
    df = local_frame(spark, rows, schema)
    assert df.schema == schema
    assert "LocalRelation" in df._jdf.queryExecution().optimizedPlan().toString()
    got = {r["slide_id"]: r for r in df.select("*", F.unix_timestamp("discovered_at").alias("t")).collect()}
    assert (got["a"]["level"], got["a"]["mpp"], got["a"]["attributes"]) == (0, 0.25, {"stain": "HE"})
    assert got["a"]["t"] == int(when.timestamp())
    assert (got["b"]["level"], got["b"]["mpp"], got["b"]["attributes"], got["b"]["t"]) == (2, None, None, None)
    assert local_frame(spark, [], schema).count() == 0


def test_delta_jar_conf_puts_the_s3a_jars_on_the_class_paths_when_fetched(tmp_path, monkeypatch):
    """``$SLIDELAKE_DELTA_JARS``: the Delta jars go to ``spark.jars``; Hadoop's S3A jars in the
    same folder, all three or none, to the driver's and executors' class paths."""
    from slidelake.spark import delta_jar_conf

    for name in ("delta-spark_4.2_2.13-4.4.0.jar", "delta-storage-4.4.0.jar", "hadoop-aws-3.5.0.jar",
                 "bundle-2.35.4.jar"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("SLIDELAKE_DELTA_JARS", str(tmp_path))
    conf = delta_jar_conf()
    assert conf["spark.jars"].split(",") == [str(tmp_path / "delta-spark_4.2_2.13-4.4.0.jar"),
                                             str(tmp_path / "delta-storage-4.4.0.jar")]
    assert "spark.driver.extraClassPath" not in conf  # the analytics accelerator is missing
    (tmp_path / "analyticsaccelerator-s3-1.3.1.jar").write_bytes(b"")
    conf = delta_jar_conf()
    want = ":".join(str(tmp_path / n) for n in ("hadoop-aws-3.5.0.jar", "bundle-2.35.4.jar",
                                                "analyticsaccelerator-s3-1.3.1.jar"))
    assert conf["spark.driver.extraClassPath"] == conf["spark.executor.extraClassPath"] == want
