#!/usr/bin/env bash
# Fetch the Delta Lake jars matching pyspark 4.2.0 from Maven Central into a cache folder outside
# the repository (default ~/.cache/slidelake/jars; $SLIDELAKE_DELTA_JARS overrides) and print
# them comma-separated. With the argument `s3`, also Hadoop's S3A connector for a lake in a bucket
# with Spark's Delta writer (s3a://): hadoop-aws matching pyspark's Hadoop 3.5.0, the AWS SDK
# bundle and the S3 analytics accelerator that release was built with (~690 MB; EMR and
# Databricks ship their own). slidelake
# itself never downloads anything at run time: pass these jars to spark-submit (--jars, or
# --driver-class-path for a local master) or set SLIDELAKE_DELTA_JARS for the embedded session.
set -euo pipefail
DEST=${SLIDELAKE_DELTA_JARS:-$HOME/.cache/slidelake/jars}
DELTA_VERSION=${DELTA_VERSION:-4.4.0}   # the newest io.delta:delta-spark_4.2_2.13 on Maven Central
HADOOP_VERSION=3.5.0                    # pyspark 4.2.0's hadoop-client-api
AWS_SDK_VERSION=2.35.4                  # aws-java-sdk-v2.version of hadoop-project 3.5.0
ACCELERATOR_VERSION=1.3.1               # amazon-s3-analyticsaccelerator-s3.version of hadoop-project 3.5.0
ARTIFACTS=("io.delta:delta-spark_4.2_2.13:$DELTA_VERSION" "io.delta:delta-storage:$DELTA_VERSION")
if [ "${1:-}" = s3 ]; then
  ARTIFACTS+=("org.apache.hadoop:hadoop-aws:$HADOOP_VERSION" "software.amazon.awssdk:bundle:$AWS_SDK_VERSION"
             "software.amazon.s3.analyticsaccelerator:analyticsaccelerator-s3:$ACCELERATOR_VERSION")
fi
mkdir -p "$DEST"
if ! command -v mvn >/dev/null 2>&1; then
  echo "[jars] installing Maven" >&2
  apt-get update -q >/dev/null && apt-get install -y -q maven >/dev/null
fi
JARS=()
for artifact in "${ARTIFACTS[@]}"; do
  name=$(echo "$artifact" | cut -d: -f2)-$(echo "$artifact" | cut -d: -f3).jar
  if [ ! -s "$DEST/$name" ]; then
    mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
      -Dartifact="$artifact" -DoutputDirectory="$DEST" >&2
  fi
  JARS+=("$DEST/$name")
done
(IFS=,; echo "${JARS[*]}")
