#!/usr/bin/env bash
# Fetch the Delta Lake jars matching pyspark 4.2.0 from Maven Central into a cache folder outside
# the repository (default ~/.cache/slidelake/jars; $SLIDELAKE_DELTA_JARS overrides). slidelake
# itself never downloads anything at run time: pass these jars to spark-submit (--jars) or set
# SLIDELAKE_DELTA_JARS for the embedded session (README: "Spark's Delta writer").
set -euo pipefail
DEST=${SLIDELAKE_DELTA_JARS:-$HOME/.cache/slidelake/jars}
DELTA_VERSION=${DELTA_VERSION:-4.4.0}   # the newest io.delta:delta-spark_4.2_2.13 on Maven Central
mkdir -p "$DEST"
if ! command -v mvn >/dev/null 2>&1; then
  echo "[jars] installing Maven" >&2
  apt-get update -q >/dev/null && apt-get install -y -q maven >/dev/null
fi
for artifact in "io.delta:delta-spark_4.2_2.13:$DELTA_VERSION" "io.delta:delta-storage:$DELTA_VERSION"; do
  name=$(echo "$artifact" | cut -d: -f2)-$DELTA_VERSION.jar
  [ -s "$DEST/$name" ] && continue
  mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
    -Dartifact="$artifact" -DoutputDirectory="$DEST" >&2
done
ls "$DEST"/delta-spark_4.2_2.13-"$DELTA_VERSION".jar "$DEST"/delta-storage-"$DELTA_VERSION".jar | paste -sd, -
