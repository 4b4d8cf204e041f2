"""Subprocess entry of tests/test_spark_writer.py: the reliability scenarios of the delta-rs
writer, run with Spark's Delta writer in one session that loads the Delta Lake jars
(``SLIDELAKE_DELTA_JARS``), as Databricks and EMR have them.

    python tests/spark_writer_job.py OUT SLIDE_DIR CORRUPT_SLIDE SHARED_LAKE

* ``OUT/rerun``: a folder of two slides tiled, rerun (skipped), forced (replaced); then a third
  slide with another tile size (refused);
* ``OUT/corrupt``: a slide with corrupt tiles (every failed tile in ``tile_errors``);
* ``OUT/blank``: a white slide whose tiles the pixel filter drops (a commit of no file);
* ``OUT/concurrent``: two runs on disjoint folders at the same time into one lake;
* ``SHARED_LAKE``: a lake the delta-rs writer made (rewritten without the typed manifest
  columns, as an older lake), appended to by Spark's writer.

Prints ``RESULT <json>``: each scenario's run records (status, counts, writer) and the row
counts Spark reads back; the test reads every table with polars and delta-rs itself.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from slidelake.config import PipelineConfig
from slidelake.pipeline import ConfigMismatchError, run_all
from slidelake.spark import get_spark


def cfg(lake: Path, inputs: list[Path], **kw) -> PipelineConfig:
    """Every tile of a small grid, no masks: the configuration of the test's delta-rs runs."""
    base = {"inputs": [str(p) for p in inputs], "lake": str(lake), "resolution": {"level": 0},
            "grid": {"tile_extent": 128}, "masks": {"enabled": False}, "filter": {"max_background_fraction": None},
            "decode": {"encoding": "png"}, "tables": {"writer": "spark", "slides_per_commit": 1}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v}
    return PipelineConfig.model_validate(base)


def record(rec) -> dict:
    return {"status": rec.status, "writer": rec.delta_writer, "counts": rec.counts, "run_id": rec.run_id}


def main() -> None:
    out, slides, corrupt, shared = (Path(a) for a in sys.argv[1:5])
    spark = get_spark("slidelake-spark-writer")
    res: dict = {}

    lake = out / "rerun"
    res["first"] = record(run_all(spark, cfg(lake, [slides / "a"])))
    res["again"] = record(run_all(spark, cfg(lake, [slides / "a"])))
    res["forced"] = record(run_all(spark, cfg(lake, [slides / "a"]), force=True))
    try:
        run_all(spark, cfg(lake, [slides / "c"], grid={"tile_extent": 64}))
        res["other_config"] = "accepted"
    except ConfigMismatchError as exc:
        res["other_config"] = f"refused: {exc}"
    res["rerun_tiles"] = spark.read.format("delta").load(str(lake / "tiles")).count()

    res["corrupt"] = record(run_all(spark, cfg(out / "corrupt", [corrupt], grid={"tile_extent": 64})))
    res["corrupt_errors"] = spark.read.format("delta").load(str(out / "corrupt" / "tile_errors")).count()

    # a slide with no tile past the pixel filter: the commit has no file and leaves no rows
    res["blank"] = record(run_all(spark, cfg(out / "blank", [slides / "blank.tiff"],
                                             filter={"max_background_fraction": 0.5})))
    res["blank_tiles"] = spark.read.format("delta").load(str(out / "blank" / "tiles")).count()

    recs, errors = {}, []

    def go(k: str) -> None:
        try:
            recs[k] = record(run_all(spark, cfg(out / "concurrent", [slides / k])))
        except Exception as exc:  # noqa: BLE001 - reported in the result
            errors.append(f"{type(exc).__name__}: {exc}"[:2000])

    threads = [threading.Thread(target=go, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["concurrent"], res["concurrent_errors"] = recs, errors

    res["shared"] = record(run_all(spark, cfg(shared, [slides / "b"])))
    res["shared_tiles"] = spark.read.format("delta").load(str(shared / "tiles")).count()
    print("RESULT " + json.dumps(res), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
