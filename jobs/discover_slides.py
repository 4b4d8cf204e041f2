"""spark-submit entry point: discover slides into <lake>/slides.

    spark-submit jobs/discover_slides.py --config conf/default.yaml --lake /data/lake /data/slides
"""

import _bootstrap  # noqa: F401  (adds src/ to sys.path in a source checkout)

from slidelake.cli import app

if __name__ == "__main__":
    import sys

    app(["discover", *sys.argv[1:]])
