"""A spark-submit job for tests/test_spark_writer.py: tile a slide twice into a lake whose tables
are registered in a catalog database, then read them by name, their history and an older version.

    spark-submit --jars ... tests/catalog_job.py LAKE SLIDE CONFIG

Prints one line ``CATALOG-JSON {...}``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slidelake import get_spark, load_config, run_all  # noqa: E402

lake, slide, config = sys.argv[1:4]
spark = get_spark()
cfg = load_config(config, {"inputs": [slide], "lake": lake, "tables": {"catalog_database": "pathology"}})
first = run_all(spark, cfg)
second = run_all(spark, cfg, force=True)  # the same slide again: its partition replaced, a new version
history = spark.sql("DESCRIBE HISTORY pathology.tiles").select("version", "operation").collect()
v0 = min(r["version"] for r in history)
out = {
    "status": [first.status, second.status],
    "writer": second.delta_writer,
    "tables": sorted(r["tableName"] for r in spark.sql("SHOW TABLES IN pathology").collect()),
    "tiles": spark.sql("SELECT count(*) AS n FROM pathology.tiles").collect()[0]["n"],
    "runs": spark.sql("SELECT count(*) AS n FROM pathology.runs").collect()[0]["n"],
    "history": [[r["version"], r["operation"]] for r in history],
    "first_version_tiles": spark.sql(f"SELECT count(*) AS n FROM pathology.tiles VERSION AS OF {v0}").collect()[0]["n"],
    "first_run_ids": [r[0] for r in spark.sql(
        f"SELECT DISTINCT run_id FROM pathology.tiles VERSION AS OF {v0}").collect()],
    "run_ids": [first.run_id, second.run_id],
}
print("CATALOG-JSON " + json.dumps(out))
spark.stop()
