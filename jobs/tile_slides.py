"""spark-submit entry point: discover and tile slides (``slidelake run``).

    spark-submit jobs/tile_slides.py --config conf/default.yaml --lake /data/lake /data/slides

Pass ``tile`` as the first argument to tile slides already in <lake>/slides without
rediscovering them (``slidelake tile``).
"""

import _bootstrap  # noqa: F401  (adds src/ to sys.path in a source checkout)

from slidelake.cli import app

if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    job = args.pop(0) if args and args[0] in ("run", "tile") else "run"
    app([job, *args])
