"""Two cores against one on a FOLDER of slides: how slidelake scales where users run it.

    .venv/bin/python bench/folder_scaling.py                     # 4 slides of 20,480 x 15,360 px
    .venv/bin/python bench/folder_scaling.py --slides 8 --rounds 16
    .venv/bin/python bench/folder_scaling.py --slides 1 --width 40960 --height 30720   # one benchmark-size slide

``bench/throughput.py`` measures N cores / 1 core on one slide, where part of a run has one
slide's worth of work that one core does while the others wait (discovering the one file, its
one mask, the plan beside it, the commit). A folder of several slides has less of that serial
part: discovery hashes files on one thread per core and the masks are one Spark task per
slide. This benchmark builds ``--slides`` SYNTHETIC slides (``bench/make_slide.py`` with seeds
1, 2, ...: the same texture, ~30 % tissue, different files; cached in ``bench/data/``), together
as many tiles as the one-slide benchmark by default, and on that folder measures
(``throughput.scaling_rounds``):

1. slidelake end to end (masks on, native reader, raw tiles) in two live sessions, one confined
   to N cores and one to 1 core, each started in a fresh process (its cold run), then
   ``--rounds`` rounds of one warm run in each, alternating which goes first. This VM's speed
   drifts by tens of per cent between minutes; the two runs of a round are seconds apart and
   share the drift, so the median of the rounds' ratios is the figure least moved by it;
2. then the read loop (``throughput.read_limit``) over exactly the kept tiles in N processes and
   in one, ``--loop-rounds`` times alternated: the machine's own scaling of a CPU-bound loop at
   that time, the ceiling of the other.

Prints one JSON document and writes it to ``--out`` (``docs/folder_scaling.json``): the N-core /
1-core ratios (warm: median of the rounds, lowest, highest, ratio of the median walls, tiling
stage ``overlap+decode+write``, without steal; cold; read loop) and per round each run's wall,
tiling-stage seconds, CPU seconds of the driver, the JVM and the Python workers
(``throughput.cpu_seconds``), the seconds its CPUs were idle or taken by the hypervisor (steal,
``throughput.idle_steal_seconds``) and the workers' own seconds per stage (``--profile``).
``docs/benchmarks.md`` quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402


def build_folder(n: int, width: int, height: int, data: Path = HERE / "data") -> Path:
    """``n`` synthetic slides (seeds 1..n) in ``<data>/folder-<w>x<h>/`` (made once, kept)."""
    folder = data / f"folder-{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        path = folder / f"synthetic-{i}.svs"
        if not path.exists():
            print(f"building {path} ...", flush=True)
            subprocess.run([sys.executable, str(HERE / "make_slide.py"), str(path), "--width", str(width),
                            "--height", str(height), "--seed", str(i)], check=True)
    return folder


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4, help="slides in the folder")
    ap.add_argument("--width", type=int, default=20480)
    ap.add_argument("--height", type=int, default=15360)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=12, help="rounds of one warm run on N cores and one on 1 core")
    ap.add_argument("--loop-rounds", type=int, default=4, help="rounds of the read loop in N processes and in 1")
    ap.add_argument("--out", default=str(ROOT / "docs" / "folder_scaling.json"))
    ap.add_argument("--data", default=str(HERE / "data"), help="where the slides are made and kept")
    a = ap.parse_args(argv)
    if a.cores < 2:
        sys.exit("folder_scaling needs at least 2 cores")
    folder = build_folder(a.slides, a.width, a.height, Path(a.data))
    slides = sorted(str(p) for p in folder.glob("synthetic-*.svs"))[: a.slides]

    kept_path = str(folder.parent / f"kept-folder-{a.slides}x{a.width}x{a.height}.parquet")
    sc = tp.scaling_rounds(slides, a.cores, a.rounds, kept_path, a.loop_rounds)
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": tp.machine(), "cores": a.cores,
        "folder": f"{a.slides} SYNTHETIC slides of {a.width} x {a.height} px (bench/make_slide.py, seeds 1-{a.slides})",
        **tp.scaling_summary(sc),
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
