"""The 100,000 x 80,000 px check: does slidelake survive a gigapixel slide, how fast, in how much memory.

    .venv/bin/python bench/large_slide.py                      # builds the slide once (~7 min, 1.2 GB)
    .venv/bin/python bench/large_slide.py --width 60000 --height 48000 --cores 2

Not part of ``bench/throughput.py``'s regular run (the slide takes minutes to build and the
check ~15 minutes to run, half of it the interleaved N-core / 1-core rounds). Steps, on the
same SYNTHETIC slide (``bench/make_slide.py``, cached in ``bench/data/``) and cores:

1. slidelake end to end, cold then warm (``throughput.run_slidelake``: a fresh process, masks
   on, native reader, raw tiles), which also lists the kept tiles;
2. the read limit (``throughput.read_limit``) over exactly those tiles;
3. slidelake again (a second fresh process), whose two warm runs alternate with the same run
   without masks (the pixel filter alone decides, every grid tile decoded): the mask-first ratio
   on a slide of typical size, where the fixed per-run costs are a small share;
4. the read limit again: this VM's speed drifts, so the slidelake run is bracketed by two
   measurements and the ratios are given against both;
5. slidelake without masks in a fresh process (cold, then one warm run): the cold mask-first
   ratio (``--no-mask-off`` skips it);
6. N cores against 1 core (``--no-one-core`` skips it; ``throughput.scaling_rounds``): a 1-core
   and an N-core live session, each started in a fresh process (its cold run), then
   ``--rounds`` rounds of one warm run in each, alternating which goes first (this VM drifts
   by tens of per cent between minutes; the two runs of a round are seconds apart), then the
   read loop over the kept tiles in N processes and in one, ``--loop-rounds`` times
   alternated: this machine's own scaling of a CPU-bound loop, the ceiling of the other;
7. slidelake storing ``jpeg`` tiles instead of ``raw`` (``--no-jpeg`` skips it): 7x fewer bytes
   to write, next to the machine's cost of fresh memory (``throughput.memory_first_touch``),
   which every page of tiles written to the page cache pays.

Prints one JSON document (walls, tiles/s/core, ratios, per-stage worker peaks, driver peaks, and
for the warm runs the stage walls and the CPU seconds of the driver, the JVM and the workers)
and writes it to ``--out`` (``docs/large_slide.json``); ``docs/benchmarks.md`` quotes it.
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


def summary(run: dict) -> dict:
    """Walls, tiles/s/core and peaks of one ``run_slidelake`` result (cold and warm)."""
    def peaks(profile: dict | None) -> dict:
        return {k: round(v) for k, v in (profile or {}).items() if k.endswith("_peak_mib")}

    return {"tiles_written": run["counts"]["tiles_written"], "tiles_generated": run["counts"]["tiles_generated"],
            "cold": {"wall_s": round(run["wall_s"], 1), "tiles_per_s_per_core": round(run["tiles_per_s_per_core"]),
                     "worker_peaks_mib": peaks(run.get("profile"))},
            "warm": {"wall_s": round(run["warm"]["wall_s"], 1),
                     "tiles_per_s_per_core": round(run["warm"]["tiles_per_s_per_core"]),
                     "worker_peaks_mib": peaks(run["warm"].get("profile")),
                     "stage_s": {k: round(v, 2) for k, v in run["warm"]["stage_seconds"].items()},
                     # CPU seconds of the driver's Python, the JVM and the Python workers
                     "cpu_s": {k: round(v, 2) for k, v in (run["warm"].get("cpu_s") or {}).items()},
                     # seconds the run's CPUs were idle and taken by the hypervisor (steal)
                     "idle_steal_s": {k: round(v, 2) for k, v in (run["warm"].get("idle_steal_s") or {}).items()}},
            "peak_rss_mib": {k: round(v) for k, v in run["peak_rss_mib"].items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-one-core", action="store_true", help="skip the N-core / 1-core rounds (step 6)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of one warm run on N cores and one on 1 core")
    ap.add_argument("--loop-rounds", type=int, default=2, help="rounds of the read loop in N processes and in 1")
    ap.add_argument("--no-mask-off", action="store_true", help="skip the cold run without masks (step 5)")
    ap.add_argument("--no-jpeg", action="store_true", help="skip the run storing jpeg tiles (step 7)")
    ap.add_argument("--data", default=str(HERE / "data"), help="where the slide is made and kept")
    ap.add_argument("--out", default=str(ROOT / "docs" / "large_slide.json"))
    a = ap.parse_args(argv)
    slide = Path(a.data) / f"synthetic-{a.width}x{a.height}.svs"
    if not slide.exists():
        slide.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {slide} ...", flush=True)
        subprocess.run([sys.executable, str(HERE / "make_slide.py"), str(slide), "--width", str(a.width),
                        "--height", str(a.height)], check=True)
    kept_path = str(Path(a.data) / f"kept-{a.width}x{a.height}.parquet")
    print("slidelake (1) ...", flush=True)
    first = tp.run_slidelake(str(slide), a.cores, "on", "auto", kept_out=kept_path, warm_runs=1)
    tiles = tp.load_kept(kept_path)
    limits = []
    print(f"read limit over {len(tiles[0][1])} kept tiles ...", flush=True)
    limits.append(tp.read_limit(tiles, (256, 256), a.cores))
    print("slidelake (2) ...", flush=True)
    second = tp.run_slidelake(str(slide), a.cores, "on", "auto", warm_runs=2, interleave_masks_off=True)
    print("read limit again ...", flush=True)
    limits.append(tp.read_limit(tiles, (256, 256), a.cores))
    ref = [lim["tiles_per_s_per_core"] for lim in limits]
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": tp.machine(),
        "slide": f"SYNTHETIC {a.width} x {a.height} px ({slide.stat().st_size / 2**30:.1f} GiB)", "cores": a.cores,
        "memory": {k: round(v, 3) for k, v in tp.memory_first_touch().items()},
        "read_limit_tiles_per_s_per_core": [round(r) for r in ref],
        "runs": [summary(first), summary(second)],
        "x_read_limit": {f"run {i + 1} {phase}": [round(r[phase]["tiles_per_s_per_core"] / lim, 2) for lim in ref]
                         for i, r in enumerate([summary(first), summary(second)]) for phase in ("cold", "warm")},
    }
    # mask-first: warm runs with and without masks alternated in one session (medians), and the
    # cold runs of two fresh processes
    off_walls = second["warm_masks_off"]["walls_s"]
    out["mask_first"] = {
        "warm_walls_s": {"masks": [round(w, 3) for w in second["warm"]["walls_s"]],
                         "no masks": [round(w, 3) for w in off_walls]},
        "warm": round(median(second["warm"]["walls_s"]) / median(off_walls), 2),
        "tiles_written_no_masks": second["warm_masks_off"]["tiles_written"],
    }
    if not a.no_mask_off:
        print("slidelake without masks ...", flush=True)
        off = tp.run_slidelake(str(slide), a.cores, "off", "auto", warm_runs=1)
        out["mask_first"]["cold_walls_s"] = {"masks": [round(first["wall_s"], 1), round(second["wall_s"], 1)],
                                             "no masks": round(off["wall_s"], 1)}
        out["mask_first"]["cold"] = [round(first["wall_s"] / off["wall_s"], 2), round(second["wall_s"] / off["wall_s"], 2)]
        out["no_masks"] = summary(off)
    if not a.no_one_core and a.cores > 1:
        print(f"slidelake on {a.cores} cores and on 1, {a.rounds} interleaved rounds; the read loop ...", flush=True)
        sc = tp.scaling_rounds(str(slide), a.cores, a.rounds, kept_path, a.loop_rounds)
        out["scaling"] = tp.scaling_summary(sc)
    if not a.no_jpeg:
        print("slidelake storing jpeg tiles ...", flush=True)
        jpeg = summary(tp.run_slidelake(str(slide), a.cores, "on", "auto", warm_runs=1, encoding="jpeg"))
        out["jpeg"] = {**jpeg, "x_read_limit": {phase: [round(jpeg[phase]["tiles_per_s_per_core"] / lim, 2) for lim in ref]
                                                for phase in ("cold", "warm")}}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
