"""Make ``src/`` importable when a job file is run from a source checkout (spark-submit)."""

import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if os.path.isdir(os.path.join(_SRC, "slidelake")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)
