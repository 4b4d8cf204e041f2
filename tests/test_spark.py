"""The embedded local session's settings."""

import pytest

from slidelake.spark import LOCAL_CONF, LOCAL_JVM_OPTIONS, local_conf


def test_local_conf_jvm_options_default_override_and_off(monkeypatch):
    monkeypatch.delenv("SLIDELAKE_JVM_OPTIONS", raising=False)
    conf = local_conf()
    assert conf["spark.driver.extraJavaOptions"] == LOCAL_JVM_OPTIONS == "-XX:TieredStopAtLevel=1"
    assert {k: conf[k] for k in LOCAL_CONF} == LOCAL_CONF

    monkeypatch.setenv("SLIDELAKE_JVM_OPTIONS", "-XX:+UseSerialGC -Xss4m")
    assert local_conf()["spark.driver.extraJavaOptions"] == "-XX:+UseSerialGC -Xss4m"

    monkeypatch.setenv("SLIDELAKE_JVM_OPTIONS", " ")
    assert "spark.driver.extraJavaOptions" not in local_conf()


@pytest.mark.spark
def test_embedded_session_jvm_runs_with_the_options(spark):
    import os

    expected = os.environ.get("SLIDELAKE_JVM_OPTIONS", LOCAL_JVM_OPTIONS).split()
    args = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert expected and all(opt in args for opt in expected), args
    assert spark.conf.get("spark.driver.extraJavaOptions") == " ".join(expected)
