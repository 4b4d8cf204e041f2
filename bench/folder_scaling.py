"""Two cores against one on a FOLDER of slides: how slidelake scales where users run it.

    .venv/bin/python bench/folder_scaling.py                     # 4 slides of 20,480 x 15,360 px
    .venv/bin/python bench/folder_scaling.py --slides 8 --pairs 3

``bench/throughput.py`` measures N cores / 1 core on one slide, where part of a run has one
slide's worth of work that one core does while the others wait (discovering the one file, its
one mask task, the plan beside it, the commit). A folder of several slides has none of that
serial part: discovery hashes files on one thread per core and the masks are one Spark task per
slide. This benchmark builds ``--slides`` SYNTHETIC slides (``bench/make_slide.py`` with seeds
1, 2, ...: the same texture, ~30 % tissue, different files; cached in ``bench/data/``), together
as many tiles as the one-slide benchmark by default, and on that folder measures:

1. slidelake end to end (masks on, native reader, raw tiles) in fresh processes on N cores and
   on 1 core (``throughput.run_slidelake``: each process confined to its cores), ``--pairs``
   pairs of sessions alternated in both orders (N, 1, 1, N, ...) because this VM's speed drifts
   by tens of per cent between minutes; each session one cold run and ``--warm-runs`` warm runs;
2. after each pair, the read loop (``throughput.read_limit``) over exactly the kept tiles in N
   processes and in one: the machine's own scaling of a CPU-bound loop at that time, the
   ceiling of the other.

Prints one JSON document and writes it to ``--out`` (``docs/folder_scaling.json``):
N cores / 1 core per pair (warm, the tiling stage alone ``overlap+decode+write``, cold, the read
loop) and their medians over the pairs, the pooled median of all warm runs, and per session the
walls, stage walls, the CPU seconds of the driver, the JVM and the Python workers
(``throughput.cpu_seconds``), the seconds the session's CPUs were idle or taken by the
hypervisor (steal, ``throughput.idle_steal_seconds``: this VM's disk writes cost the busy vCPUs
time, which a 1-core run does not pay; "warm without steal" estimates the ratio without it)
and the workers' own seconds per stage (``--profile``).
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
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402

TILING = "overlap+decode+write"  # the tiling stage's name in the runs table's stage_seconds


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


def session_figures(run: dict) -> dict:
    """One session's walls (s), tiling-stage seconds and workers' profile (warm median run)."""
    return {"cold_wall_s": round(run["wall_s"], 2),
            "cold_tiling_s": round(run["stage_seconds"][TILING], 2),
            "warm_walls_s": [round(w, 2) for w in run["warm"]["walls_s"]],
            "warm_wall_s": round(run["warm"]["wall_s"], 2),
            "warm_tiling_s": round(run["warm"]["stage_seconds"][TILING], 2),
            "warm_stage_s": {k: round(v, 2) for k, v in run["warm"]["stage_seconds"].items()},
            # CPU seconds of the driver's Python, the JVM and the Python workers (warm median run)
            "warm_cpu_s": {k: round(v, 2) for k, v in run["warm"]["cpu_s"].items()},
            # seconds the session's CPUs were idle and taken by the hypervisor (steal), same run
            "warm_idle_steal_s": {k: round(v, 2) for k, v in run["warm"]["idle_steal_s"].items()},
            # the workers' own seconds per stage, summed over tasks (``--profile``)
            "warm_worker_s": {k: round(v, 2) for k, v in (run["warm"].get("profile") or {}).items()
                              if k.endswith(("_s", ".s")) and not k.startswith("wall.")}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4, help="slides in the folder")
    ap.add_argument("--width", type=int, default=20480)
    ap.add_argument("--height", type=int, default=15360)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--pairs", type=int, default=4, help="pairs of N-core / 1-core sessions, alternated")
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "folder_scaling.json"))
    ap.add_argument("--data", default=str(HERE / "data"), help="where the slides are made and kept")
    a = ap.parse_args(argv)
    if a.cores < 2:
        sys.exit("folder_scaling needs at least 2 cores")
    folder = build_folder(a.slides, a.width, a.height, Path(a.data))
    slides = sorted(str(p) for p in folder.glob("synthetic-*.svs"))[: a.slides]

    kept_path = str(folder.parent / f"kept-folder-{a.slides}x{a.width}x{a.height}.parquet")
    sessions: dict[int, list[dict]] = {a.cores: [], 1: []}
    pairs = []
    tiles = None
    for p in range(a.pairs):
        order = [a.cores, 1] if p % 2 == 0 else [1, a.cores]
        runs = {}
        for cores in order:
            print(f"pair {p + 1}: slidelake on {cores} core(s) ...", flush=True)
            run = tp.run_slidelake(slides, cores, "on", "auto", warm_runs=a.warm_runs,
                                   kept_out=kept_path if tiles is None else None)
            if run.get("status") != "succeeded":
                sys.exit(f"slidelake run failed: {json.dumps(run)[:2000]}")
            if tiles is None:
                tiles = tp.load_kept(kept_path)
            runs[cores] = run
            sessions[cores].append(session_figures(run))
        # the read loop right after the pair's sessions, in the same order: the machine's own
        # N-process / 1-process scaling at that time (its speed drifts by tens of per cent)
        loops = {cores: tp.read_limit(tiles, (256, 256), cores) for cores in order}
        pairs.append({"order": f"{order[0]}c then {order[1]}c",
                      "warm": round(runs[1]["warm"]["wall_s"] / runs[a.cores]["warm"]["wall_s"], 2),
                      "warm tiling stage": round(runs[1]["warm"]["stage_seconds"][TILING]
                                                 / runs[a.cores]["warm"]["stage_seconds"][TILING], 2),
                      # the same with each warm run's wall less its CPUs' steal per CPU: what the
                      # ratio would be had the hypervisor not taken that time (an estimate)
                      "warm without steal": round(
                          (runs[1]["warm"]["wall_s"] - runs[1]["warm"]["idle_steal_s"]["steal"])
                          / (runs[a.cores]["warm"]["wall_s"] - runs[a.cores]["warm"]["idle_steal_s"]["steal"] / a.cores), 2),
                      "cold": round(runs[1]["wall_s"] / runs[a.cores]["wall_s"], 2),
                      "read loop": round(loops[a.cores]["tiles_per_s_per_core"] * a.cores
                                         / loops[1]["tiles_per_s_per_core"], 2),
                      "read loop tiles/s/core": {f"{c}p": round(lp["tiles_per_s_per_core"]) for c, lp in loops.items()}})
        tiles_written = runs[a.cores]["counts"]["tiles_written"]

    def warm_median(cores: int) -> float:  # over all warm runs of all sessions on ``cores``
        return median(w for s in sessions[cores] for w in s["warm_walls_s"])

    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": tp.machine(), "cores": a.cores,
        "folder": f"{a.slides} SYNTHETIC slides of {a.width} x {a.height} px (bench/make_slide.py, seeds 1-{a.slides})",
        "tiles_written": tiles_written,
        f"{a.cores}c_over_1c": {
            # each pair's sessions ran one after the other, so the median of the pairs' ratios is
            # the figure least moved by the VM's drift; the pooled medians are given beside it
            **{f"{k} (median of pairs)": round(median(pr[k] for pr in pairs), 2)
               for k in ("warm", "warm tiling stage", "warm without steal", "cold", "read loop")},
            "warm (median of all warm runs)": round(warm_median(1) / warm_median(a.cores), 2),
            "pairs": pairs,
        },
        "warm_tiles_per_s_per_core": {f"{c}c": round(tiles_written / warm_median(c) / c) for c in (a.cores, 1)},
        "sessions": {f"{c}c": s for c, s in sessions.items()},
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
