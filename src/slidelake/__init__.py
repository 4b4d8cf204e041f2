"""slidelake: whole-slide images to Delta tables of tiles with lineage, on PySpark.

What a user calls::

    from slidelake import get_spark, load_config, run_all, summary
    rec = run_all(get_spark(), load_config("conf/default.yaml", {"inputs": ["/data/slides"], "lake": "lake"}))
    print(summary(rec))

The pipeline's stages, in order, each in its own module: :mod:`slidelake.slides` (discover,
with :mod:`slidelake.manifest`), :mod:`slidelake.masks` (with :mod:`slidelake.tissue` and
:mod:`slidelake.overlays`), :mod:`slidelake.resolution`, :mod:`slidelake.grid`,
:mod:`slidelake.overlap`, :mod:`slidelake.decode` (repartition and decode),
:mod:`slidelake.filtering`, :mod:`slidelake.write` (write and commit), :mod:`slidelake.qc`,
:mod:`slidelake.lineage` (runs). :mod:`slidelake.pipeline` chains them; :class:`Lake` owns the
tables; :mod:`slidelake.cli` is the command line (``sql``: :mod:`slidelake.query`). The names
below are imported on first use, so ``import slidelake`` does not start Spark or load the
pipeline.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "slidelake.config", "PipelineConfig": "slidelake.config",
    "get_spark": "slidelake.spark",
    "run_all": "slidelake.pipeline", "run_discover": "slidelake.pipeline", "run_masks": "slidelake.pipeline",
    "run_tile": "slidelake.pipeline", "summary": "slidelake.pipeline", "ConfigMismatchError": "slidelake.incremental",
    "Lake": "slidelake.lake", "RunRecord": "slidelake.lineage",
    "decode_tile": "slidelake.encoding", "encode_tile": "slidelake.encoding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slidelake' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
