"""spark-submit entry point: compute tissue masks of slides in <lake>/slides (``slidelake masks``).

    spark-submit jobs/make_masks.py --config conf/default.yaml --lake /data/lake

``jobs/tile_slides.py`` (``slidelake run`` / ``tile``) also makes missing masks when masks are
enabled; this job precomputes them, e.g. to review the QC pictures before tiling.
"""

import _bootstrap  # noqa: F401  (adds src/ to sys.path in a source checkout)

from slidelake.cli import app

if __name__ == "__main__":
    import sys

    app(["masks", *sys.argv[1:]])
