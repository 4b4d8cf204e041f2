"""slidelake against the read limit and the naive baseline on real slides the user passes.

    .venv/bin/python bench/throughput.py --slides /data/wsi           # a folder, files, globs or a manifest
    .venv/bin/python bench/real_slides.py ../shared/slides --warm-runs 1

The same side-by-side comparison as the synthetic run (``bench/throughput.py``), on the user's
own slides, in one run on the same cores (level 0, 256 px tiles, ``raw`` encoding, tissue masks
on, tiles kept when >= 50 % tissue, the native reader where it applies):

1. slidelake end to end over all the slides (``throughput.run_slidelake``: a fresh process,
   cold, then ``--warm-runs`` warm runs into fresh lakes, the median reported), which also lists
   the tiles it kept and the ``slides`` rows (slides that cannot be read are reported with their
   error; they have no tiles);
2. the read limit (``throughput.read_limit``) over exactly those tiles, one process per core,
   one handle per slide and process, measured before and after the naive baseline (the
   reference is their mean);
3. the naive baseline (``throughput.naive_baseline``) over the same tiles; it holds every tile in
   memory (192 KiB each), so above ``--naive-max-tiles`` it gets an evenly spaced subset and the
   report says so (rates per tile and core stay comparable).

Prints a Markdown report and writes the figures as JSON (``--out``, default
``bench/out/real-slides.json``). ``docs/benchmarks.md`` is not rewritten: its figures are those
of the synthetic run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402

TILE = (256, 256)


def subset(tiles: list[tuple[str, np.ndarray]], limit: int) -> list[tuple[str, np.ndarray]]:
    """At most ``limit`` of ``tiles`` (``[(path, rows)]``), evenly spaced over the whole list,
    keeping the slide and raster order."""
    total = sum(len(c) for _, c in tiles)
    if total <= limit:
        return tiles
    keep = np.zeros(total, bool)
    keep[np.linspace(0, total - 1, limit).astype(np.int64)] = True
    out, start = [], 0
    for path, coords in tiles:
        k = keep[start:start + len(coords)]
        start += len(coords)
        if k.any():
            out.append((path, coords[k]))
    return out


def run(slides: list[str], cores: int, warm_runs: int, naive_max_tiles: int) -> dict:
    """Steps 1-3 of the module docstring on ``slides`` (files, folders, globs or manifests, as
    ``slidelake run`` takes them) on ``cores`` cores. Returns the figures (JSON-serialisable):
    ``slidelake`` (``throughput.run_slidelake``'s result, with the ``slides`` rows),
    ``kept_tiles`` (per slide path), and, when any tile was kept, ``read_limit`` and ``naive``.

    Raises:
        RuntimeError: the slidelake process failed (its stderr is in the message).
    """
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": tp.machine(), "cores": cores, "inputs": slides}
    with tempfile.TemporaryDirectory() as tmp:
        kept_file = os.path.join(tmp, "kept.parquet")
        print("slidelake ...", flush=True)
        sl = tp.run_slidelake(slides, cores, "on", "auto", kept_out=kept_file, warm_runs=warm_runs)
        res["slidelake"] = sl
        tiles = tp.load_kept(kept_file)  # the child always writes it, empty when nothing was tiled
        res["kept_tiles"] = {p: len(c) for p, c in tiles}
        if not tiles:
            return res
        limits = []
        print(f"read limit over {sum(len(c) for _, c in tiles)} kept tiles ...", flush=True)
        limits.append(tp.read_limit(tiles, TILE, cores))
        naive_tiles = subset(tiles, naive_max_tiles)
        print(f"naive baseline over {sum(len(c) for _, c in naive_tiles)} tiles ...", flush=True)
        res["naive"] = tp.naive_baseline(naive_tiles, TILE, cores, os.path.join(tmp, "naive.parquet"))
        print("read limit again ...", flush=True)
        limits.append(tp.read_limit(tiles, TILE, cores))
    res["read_limit"] = {"runs_tiles_per_s_per_core": [r["tiles_per_s_per_core"] for r in limits],
                         "tiles_per_s_per_core": float(np.mean([r["tiles_per_s_per_core"] for r in limits])),
                         "tiles": limits[0]["tiles"]}
    return res


def report(res: dict) -> str:
    """The figures of :func:`run` as Markdown: the slides, the side-by-side table and the ratios."""
    m, c, sl = res["machine"], res["cores"], res["slidelake"]
    lines = [f"Run {res['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; Python {m['python']}, "
             f"PySpark {m['pyspark']}, OpenSlide {m['openslide']}. Inputs: {', '.join(res['inputs'])}; level 0, "
             f"256 px tiles, raw encoding, tissue masks, tiles kept when >= 50 % tissue. N = {c} cores.", ""]
    kept = res.get("kept_tiles", {})
    rows = [[Path(s["path"]).name, s.get("vendor") or "", f"{s['width']} x {s['height']}" if s.get("width") else "",
             s.get("level_count") or "", f"{s['mpp_x']:.4f}" if s.get("mpp_x") else "none", s["status"],
             kept.get(s["path"], 0), (s.get("error") or "")[:120]] for s in sl.get("slides", [])]
    lines.append(tp.table(rows, ["slide", "vendor", "level 0 (px)", "levels", "mpp", "status", "kept tiles", "error"]))
    lines += [f"- {e['stage']} failed for {Path(e['path']).name}: {e['error'][:200]}" for e in sl.get("slide_errors", [])
              if e["stage"] != "discover"]  # discovery's errors are in the table above
    if "read_limit" not in res:
        lines += ["", "No tiles were kept, so there is nothing to compare against the read limit."]
        return "\n".join(lines)
    lim = res["read_limit"]["tiles_per_s_per_core"]
    naive, warm = res["naive"], sl["warm"]
    rows = [["read limit (`read_region` loop, mean of 2)", res["read_limit"]["tiles"], "",
             f"{lim:.0f}", "1.00"],
            ["naive baseline (ProcessPoolExecutor)", naive["tiles"], f"{naive['wall_s']:.1f}",
             f"{naive['tiles_per_s_per_core']:.0f}", f"{naive['tiles_per_s_per_core'] / lim:.2f}"],
            ["slidelake, cold (first run of the session)", sl["counts"]["tiles_written"], f"{sl['wall_s']:.1f}",
             f"{sl['tiles_per_s_per_core']:.0f}", f"{sl['tiles_per_s_per_core'] / lim:.2f}"],
            [f"slidelake, warm (median of {len(warm['walls_s'])})", sl["counts"]["tiles_written"],
             f"{warm['wall_s']:.1f}", f"{warm['tiles_per_s_per_core']:.0f}", f"{warm['tiles_per_s_per_core'] / lim:.2f}"]]
    lines += ["", tp.table(rows, ["what", "tiles", "wall s", "tiles/s/core", "x read limit"]), "",
              "Read limit measured twice (before and after the naive baseline): "
              + ", ".join(f"{v:.0f}" for v in res["read_limit"]["runs_tiles_per_s_per_core"]) + " tiles/s/core.",
              "", f"- slidelake / naive baseline: cold **{sl['tiles_per_s_per_core'] / naive['tiles_per_s_per_core']:.1f}x**, "
              f"warm **{warm['tiles_per_s_per_core'] / naive['tiles_per_s_per_core']:.1f}x**",
              f"- slidelake / read limit: cold **{sl['tiles_per_s_per_core'] / lim:.2f}x**, "
              f"warm **{warm['tiles_per_s_per_core'] / lim:.2f}x**"]
    if naive["tiles"] < res["read_limit"]["tiles"]:
        lines.append(f"- the naive baseline read an evenly spaced {naive['tiles']} of the {res['read_limit']['tiles']} "
                     f"kept tiles (`--naive-max-tiles`): it holds every tile in memory")
    peaks = sl.get("peak_rss_mib", {})
    lines.append(f"- peak RSS: Python worker {peaks.get('python_worker_max', 0):.0f} MiB, driver Python "
                 f"{peaks.get('driver_python', 0):.0f} MiB, driver JVM {peaks.get('driver_jvm', 0):.0f} MiB; "
                 f"naive baseline's driver {naive['driver_peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", nargs="+", help="slide files, folders, glob patterns or a manifest (as `slidelake run`)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--warm-runs", type=int, default=3, help="warm runs of slidelake (the median is reported)")
    ap.add_argument("--naive-max-tiles", type=int, default=20_000,
                    help="at most this many tiles for the naive baseline, which holds them all in memory")
    ap.add_argument("--out", default=str(HERE / "out" / "real-slides.json"))
    a = ap.parse_args(argv)
    res = run([str(Path(s).resolve()) if os.path.exists(s) else s for s in a.slides], a.cores, a.warm_runs,
              a.naive_max_tiles)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(report(res))
    print(f"\n(figures in {a.out})")


if __name__ == "__main__":
    main()
