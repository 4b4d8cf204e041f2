"""slidelake: whole-slide images to Delta tables of tiles with lineage, on PySpark.

Pipeline stages, in order (each a module): :mod:`slidelake.slides` (discover),
:mod:`slidelake.resolution`, :mod:`slidelake.grid`, :mod:`slidelake.decode` (repartition and
decode), :mod:`slidelake.filtering`, :mod:`slidelake.tables` (write), :mod:`slidelake.lineage`
(runs). :mod:`slidelake.pipeline` chains them; :mod:`slidelake.cli` is the command line.
"""

__version__ = "0.1.0"
