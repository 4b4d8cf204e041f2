"""Throughput and memory benchmark: slidelake against the read limit and the naive baseline.

One command, everything measured in the same run on the same slide and cores:

    .venv/bin/python bench/throughput.py                   # 40,960 x 30,720 synthetic slide
    .venv/bin/python bench/throughput.py --width 12288 --height 9216 --warm-runs 1   # a smaller check
    .venv/bin/python bench/throughput.py --slides /data/wsi   # your own slides (bench/real_slides.py)

1. read limit: ``OpenSlide.read_region`` in a tight loop over exactly the tiles the pipeline
   keeps, one process per core, one handle per process, pixels discarded;
2. naive baseline (what the seed blog does): a ``ProcessPoolExecutor`` over tile coordinates,
   opening the slide inside the worker function, tiles collected on the driver and saved as
   ``raw`` bytes in one Parquet file (given the same kept tiles, which flatters it: it has no
   mask);
3. slidelake end to end (discover, masks, overlap, decode, write Delta) on ``local[N]``, raw
   encoding, level 0, 256 px tiles, in a fresh process per run: with masks, without masks (the
   pixel filter alone), on 1 core, and with ``decode.reader=openslide``; each cold (the
   session's first run) then warm (``--warm-runs``, median). This VM drifts, so the ratios
   that compare runs are measured close together: the warm runs with masks alternate with runs
   without masks in one session, and the warm N-core / 1-core ratio comes from warm runs of
   a 1-core and an N-core session kept alive side by side and interleaved (``scaling_rounds``);
4. stage costs: grid expansion (rows/s, >= 1 million tiles), mask overlap (tiles/s), encoding per
   format (ms/tile, bytes/tile), the workers' decode and tile Parquet write (per core, from ``--profile``);
5. peak memory (VmHWM) of the driver JVM, the driver Python and the Python workers, on the
   large slide and on the small real CMU sample.

Writes ``docs/benchmarks.json`` and the tables of ``docs/benchmarks.md`` (between the
``<!-- results -->`` markers). The slide is SYNTHETIC (``bench/make_slide.py``), cached in
``bench/data/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
SHARED = Path(os.environ.get("SLIDELAKE_TEST_SLIDES", ROOT.parent / "shared" / "slides"))
CMU = SHARED / "aperio" / "CMU-1-Small-Region.svs"
TILING = "overlap+decode+write"  # the tiling stage's name in a run's stage_seconds
# the Delta Lake jars (jobs/fetch_jars.sh): with them, the run committed by Spark's Delta writer is measured too
DELTA_JARS = Path(os.environ.get("SLIDELAKE_DELTA_JARS") or Path.home() / ".cache" / "slidelake" / "jars")


# ------------------------------------------------------------------------------- helpers

def vm_hwm_kib(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM, KiB) of a process, 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of every live descendant of ``root``."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out[c] = cmd.get(c, "")
                frontier.append(c)
    return out


def is_jvm(cmd: str) -> bool:
    """Whether a command line (:func:`descendants`) is a JVM's (Spark's driver JVM)."""
    return "java" in cmd.split(" ")[0]


def cpu_seconds(root: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system, ``/proc/<pid>/stat``) used so far by ``root`` (default: this
    process: the driver's Python), by the JVMs among its descendants, and by the other
    descendants (PySpark's daemon and Python workers), each with the children it has reaped
    (a worker that exited counts through the daemon). Differences of two calls give what each
    part of a run used."""
    root = os.getpid() if root is None else root
    hz = os.sysconf("SC_CLK_TCK")

    def used(pid: int, children: bool) -> float:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)) / hz

    out = {"driver": used(root, False), "jvm": 0.0, "python_workers": 0.0}
    for pid, cmd in descendants(root).items():
        key = "jvm" if is_jvm(cmd) else "python_workers"
        out[key] += used(pid, True)
    return out


def idle_steal_seconds(cpus: set[int] | None = None) -> dict[str, float]:
    """Seconds so far (``/proc/stat``, summed over ``cpus``, default: the CPUs this process may
    run on) that those CPUs spent idle (``idle`` + ``iowait``) and that the hypervisor ran
    something else while they had work (``steal``). Differences of two calls give a run's.

    Steal is how a VM's own disk writes show up: the host does them on its CPUs, and when every
    vCPU of the VM is busy that time is taken from them. On this project's 2-vCPU VM, writing
    ~0.4 GB/s with ``O_DIRECT`` beside two CPU-bound processes cost 0.6 CPUs of steal and none
    beside one (``docs/benchmarks.md``)."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    hz = os.sysconf("SC_CLK_TCK")
    out = {"idle": 0.0, "steal": 0.0}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *f = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            out["idle"] += (int(f[3]) + int(f[4])) / hz
            out["steal"] += int(f[7]) / hz if len(f) > 7 else 0.0
    return out


def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    import openslide
    import pyspark

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python": platform.python_version(),
            "pyspark": pyspark.__version__, "openslide": openslide.__library_version__,
            "platform": platform.platform(), "free_page_reporting": free_page_reporting()}


def free_page_reporting(devices: str = "/sys/bus/virtio/devices") -> bool | None:
    """Whether this machine is a VM guest whose balloon device reports free pages to the host
    (virtio device id 5 with feature bit 5, ``VIRTIO_BALLOON_F_REPORTING``, virtio spec 5.5.3):
    memory the guest frees then goes back to the host, and the next use of it is a fresh
    allocation there (:func:`memory_first_touch`). None when there is no balloon device."""
    found = None
    for dev in Path(devices).glob("*") if Path(devices).is_dir() else []:
        try:
            if int((dev / "device").read_text().strip(), 16) == 5:
                found = bool(found) or (dev / "features").read_text().strip()[5:6] == "1"
        except (OSError, ValueError):
            continue
    return found


def memory_first_touch(mib: int = 1024, settle_s: float = 10.0) -> dict:
    """Seconds per GiB to write into ``mib`` MiB of memory this process has just allocated (the
    first touch: the kernel's page faults and, on a VM, the host's), then into the same memory
    again (already backed). Every page of tiles written to the page cache is new memory, so the
    difference is what writing a tile costs beyond the copy on this machine.

    A VM guest that reports free pages to its host (``virtio_balloon``) hands memory freed by
    earlier runs back within seconds; until then, new allocations reuse it at the cheaper rate.
    ``settle_s`` seconds of waiting first make the figure that of memory the host has taken back
    (on the J-L machine of ``docs/benchmarks.md``: 2.3-2.5 s/GiB after 10-30 s of waiting,
    0.07-0.5 s/GiB within 5 s of another process freeing memory)."""
    time.sleep(settle_s)
    a = np.empty(mib * 2**20, np.uint8)
    t = time.perf_counter()
    a.fill(1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    a.fill(2)
    again = time.perf_counter() - t
    del a
    gib = mib / 1024
    return {"first_touch_s_per_gib": first / gib, "again_s_per_gib": again / gib,
            "first_touch_ms_per_raw_tile": first / gib / 2**30 * 256 * 256 * 3 * 1000}


# ------------------------------------------------------------------- 1. the read limit

def split_tiles(tiles: list[tuple[str, np.ndarray]], parts: int) -> list[list[tuple[str, np.ndarray]]]:
    """``tiles`` (``[(slide path, rows x, y, level)]``, in slide then raster order) cut into
    ``parts`` contiguous chunks of (within one tile) equal counts; each chunk is again a list of
    ``(path, rows)``, so a process opens each slide of its chunk once."""
    starts = np.cumsum([0] + [len(c) for _, c in tiles])
    edges = np.linspace(0, starts[-1], parts + 1).round().astype(np.int64)
    chunks = []
    for a, b in zip(edges[:-1], edges[1:]):
        chunks.append([(path, coords[max(a, s0) - s0:min(b, s1) - s0])
                       for (path, coords), s0, s1 in zip(tiles, starts[:-1], starts[1:]) if max(a, s0) < min(b, s1)])
    return chunks


def _read_chunk(args) -> int:
    import openslide

    chunk, size = args
    n = 0
    for path, coords in chunk:
        with openslide.OpenSlide(path) as s:
            for x, y, level in coords:
                np.asarray(s.read_region((int(x), int(y)), int(level), size))
                n += 1
    return n


def read_limit(tiles: list[tuple[str, np.ndarray]], size: tuple[int, int], cores: int) -> dict:
    """Tight ``read_region`` loop over ``tiles`` (``[(slide path, rows x, y, level in level-0
    px)]``, see :func:`load_kept`), cut in order into one contiguous chunk per process
    (:func:`split_tiles`), one handle per slide and process."""
    chunks = [(c, size) for c in split_tiles(tiles, cores)]
    with get_context("fork").Pool(cores) as pool:
        # warm the page cache and the imports
        pool.map(_read_chunk, [([(path, c[:20]) for path, c in tiles], size)] * cores)
        t = time.perf_counter()
        n = sum(pool.map(_read_chunk, chunks))
        wall = time.perf_counter() - t
    return {"tiles": n, "wall_s": wall, "tiles_per_s_per_core": n / wall / cores}


# ----------------------------------------------------------------- 2. the naive baseline

def _naive_tile(path: str, x: int, y: int, level: int, size: tuple[int, int]) -> bytes:
    import openslide  # the seed blog: open the slide inside the worker function, per tile

    slide = openslide.OpenSlide(path)
    rgb = slide.read_region((x, y), level, size).convert("RGB")
    slide.close()
    return np.asarray(rgb).tobytes()


def naive_baseline(tiles: list[tuple[str, np.ndarray]], size: tuple[int, int], cores: int, out: str) -> dict:
    """The seed blog's tiler over ``tiles`` (as :func:`read_limit`): one future per tile, every
    tile's bytes collected on the driver, then one Parquet file (``path, x, y, tile``) at ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=cores, mp_context=get_context("fork")) as ex:
        futures = [ex.submit(_naive_tile, path, int(x), int(y), int(lv), size) for path, coords in tiles
                   for x, y, lv in coords]
        pixels = [f.result() for f in futures]
    coords = np.concatenate([c for _, c in tiles])
    table = pa.table({"path": [path for path, c in tiles for _ in range(len(c))], "x": coords[:, 0],
                      "y": coords[:, 1], "tile": pixels})
    pq.write_table(table, out, compression="zstd")
    wall = time.perf_counter() - t
    return {"tiles": len(pixels), "wall_s": wall, "tiles_per_s_per_core": len(pixels) / wall / cores,
            "driver_peak_rss_mib": vm_hwm_kib() / 1024}


# --------------------------------------------------------------- 3. slidelake end to end

def write_kept(spark, lake: str, out: str) -> None:
    """Write the kept tiles of the lake's ``tiles`` table to the Parquet file ``out``
    (``path, level0_x, level0_y, level``, slides in path order, tiles in raster order; empty
    when no slide could be tiled), for :func:`load_kept`."""
    import pandas as pd

    from slidelake.lake import Lake

    kept = pd.DataFrame({"path": pd.Series(dtype=str), **{c: pd.Series(dtype="int64") for c in
                                                           ("level0_x", "level0_y", "level")}})
    tiles = Lake(spark, lake)
    if tiles.exists("tiles"):
        t = tiles.read("tiles").select(*kept.columns)
        kept = t.orderBy("path", "level0_y", "level0_x").toPandas()
    kept.to_parquet(out)


def slidelake_child(args) -> None:
    """Run one slidelake job in this (fresh) process and print its figures as JSON.

    The process (and so the Spark JVM and the Python workers it starts) is confined to
    ``args.cores`` CPUs: with ``local[1]`` alone, the JVM, the driver and the commit would still
    run on the other cores and flatter the 1-core figure."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    os.environ["SLIDELAKE_SPARK_MASTER"] = f"local[{args.cores}]"
    from slidelake.config import PipelineConfig
    from slidelake.pipeline import run_all
    from slidelake.spark import get_spark

    t0 = time.perf_counter()
    spark = get_spark("slidelake-bench")
    started = time.perf_counter() - t0
    def config(masks: str, lake: str) -> PipelineConfig:
        return PipelineConfig.model_validate({
            "inputs": args.slide, "lake": lake,
            "resolution": {"level": 0}, "grid": {"tile_extent": 256},
            "decode": {"encoding": args.encoding, "reader": args.reader},
            "masks": {"enabled": masks == "on"},
            "tables": {"direct_io": not args.page_cache, "writer": args.writer},
            # with masks: keep tiles >= 50 % tissue; without: the pixel filter alone decides
            "filter": {"min_tissue_fraction": 0.5, "max_background_fraction": None if masks == "on" else 0.5},
        })

    cfg = config(args.masks, args.lake)
    t = time.perf_counter()
    rec = run_all(spark, cfg, profile=True)
    wall = time.perf_counter() - t
    # the same run again in the same session, into a fresh lake: Spark's first-job warm-up (JIT,
    # class loading, Python worker start) is paid once per session, so this is the per-run cost
    # of a notebook, a scheduled job over many slides, or any run after the first
    # (``--warm-runs`` times, each into a fresh lake; the run of median wall time is reported:
    # this VM's speed drifts by 20-30 %, as the read limit's three measurements show)
    # With --interleave-masks-off, each warm run is followed by the same run without masks in
    # the same session, so that the mask-first ratio compares runs made one after the other.
    def warm_run(lake: str) -> tuple[float, Any, dict, dict]:
        # one warm run into a fresh lake: its wall, run record, CPU by process and idle/steal
        c0, m0 = cpu_seconds(), idle_steal_seconds()
        t = time.perf_counter()
        rec_i = run_all(spark, config(args.masks, lake), profile=True)
        wall_i = time.perf_counter() - t
        c1, m1 = cpu_seconds(), idle_steal_seconds()
        shutil.rmtree(lake, ignore_errors=True)
        return wall_i, rec_i, {k: c1[k] - c0[k] for k in c0}, {k: m1[k] - m0[k] for k in m0}

    if args.serve:  # a live session (:class:`LiveSession`): the cold run, then one warm run per line read
        if args.kept_out:
            write_kept(spark, args.lake, args.kept_out)
        print("BENCH-JSON " + json.dumps({"wall_s": wall, "status": rec.status, "counts": rec.counts,
                                          "stage_seconds": rec.stage_seconds}), flush=True)
        for i, _ in enumerate(sys.stdin):
            w, r, cpu, idle_steal = warm_run(f"{args.lake}-warm{i}")
            print("BENCH-JSON " + json.dumps({"wall_s": w, "status": r.status, "counts": r.counts,
                                              "stage_seconds": r.stage_seconds, "cpu_s": cpu,
                                              "idle_steal_s": idle_steal, "profile": r.profile}), flush=True)
        spark.stop()
        return
    warms, warms_off = [], []
    for i in range(max(1, args.warm_runs)):
        warms.append(warm_run(f"{args.lake}-warm{i}"))
        if args.interleave_masks_off:
            t = time.perf_counter()
            rec_i = run_all(spark, config("off", f"{args.lake}-off{i}"), profile=True)
            warms_off.append((time.perf_counter() - t, rec_i))
            shutil.rmtree(f"{args.lake}-off{i}", ignore_errors=True)
    warm_wall, warm, warm_cpu, warm_idle_steal = sorted(warms, key=lambda w: w[0])[len(warms) // 2]
    kids = descendants(os.getpid())
    jvm = [p for p, c in kids.items() if is_jvm(c)]
    workers = [p for p, c in kids.items() if "python" in c and p not in jvm]
    out = {
        "wall_s": wall, "spark_start_s": started, "status": rec.status, "counts": rec.counts,
        "stage_seconds": rec.stage_seconds, "cores": args.cores, "masks": args.masks, "reader": args.reader,
        "encoding": args.encoding,
        "tiles_per_s_per_core": rec.counts.get("tiles_written", 0) / wall / args.cores,
        "profile": rec.profile,
        "warm": {"wall_s": warm_wall, "stage_seconds": warm.stage_seconds, "profile": warm.profile,
                 "tiles_per_s_per_core": warm.counts.get("tiles_written", 0) / warm_wall / args.cores,
                 "walls_s": [w for w, *_ in warms],
                 # CPU seconds of the driver's Python, the JVM and the Python workers in that run
                 "cpu_s": warm_cpu,
                 # seconds the run's CPUs were idle, and taken by the hypervisor (steal)
                 "idle_steal_s": warm_idle_steal},
        "warm_masks_off": {"walls_s": [w for w, _ in warms_off],
                           "tiles_written": [r.counts.get("tiles_written", 0) for _, r in warms_off]} if warms_off else None,
        "peak_rss_mib": {
            "driver_python": vm_hwm_kib() / 1024,
            "driver_jvm": max([vm_hwm_kib(p) for p in jvm] or [0]) / 1024,
            # the workers reset their VmHWM at the start of each stage (--profile); their peak
            # is the largest of the stage peaks they reported and what the live ones still show
            "python_worker_max": max([vm_hwm_kib(p) / 1024 for p in workers]
                                     + [v for r in [rec] + [w for _, w, *_ in warms] for k, v in (r.profile or {}).items()
                                        if k.endswith("worker_peak_mib")] + [0.0]),
        },
    }
    if args.kept_out:
        # the first run's kept tiles (for the read limit and the naive baseline) and slides
        from slidelake.lake import Lake

        write_kept(spark, args.lake, args.kept_out)
        slides = Lake(spark, args.lake).read("slides").select(
            "path", "vendor", "width", "height", "level_count", "mpp_x", "status", "error").orderBy("path")
        out["slides"] = [r.asDict() for r in slides.collect()]
        out["slide_errors"] = rec.slide_errors
    spark.stop()
    print("BENCH-JSON " + json.dumps(out))


def child_command(slide: str | list[str], lake: str, cores: int, masks: str, reader: str,
                  kept_out: str | None) -> list[str]:
    """The command line of a :func:`slidelake_child` process over ``slide`` (a path, or several)
    into ``lake``, on ``cores`` cores, writing its first run's kept tiles to ``kept_out``."""
    paths = [slide] if isinstance(slide, str) else list(slide)
    return ([sys.executable, str(Path(__file__)), "--child", "--slide", *paths, "--lake", lake, "--cores", str(cores),
             "--masks", masks, "--reader", reader] + (["--kept-out", kept_out] if kept_out else []))


def run_slidelake(slide: str | list[str], cores: int, masks: str = "on", reader: str = "auto",
                  kept_out: str | None = None, warm_runs: int = 3, interleave_masks_off: bool = False,
                  encoding: str = "raw", page_cache: bool = False, writer: str = "delta-rs") -> dict:
    """One configuration in a fresh process (:func:`slidelake_child`): a cold run over ``slide``
    (a path, or several: files, folders, globs, manifests), then ``warm_runs`` warm runs in the
    same session (the median is reported as ``warm``), each followed by a run without masks when
    ``interleave_masks_off``; tiles stored as ``encoding``, written through the page cache when
    ``page_cache`` (``tables.direct_io=false``), committed by ``writer`` (``spark`` needs
    ``$SLIDELAKE_DELTA_JARS``, :func:`slidelake.spark.delta_jar_conf`). ``kept_out``: a Parquet file for the
    first run's kept tiles (:func:`load_kept`); the result then also lists the ``slides`` rows
    and ``slide_errors``."""
    lake = tempfile.mkdtemp(prefix="slidelake-bench-")
    cmd = child_command(slide, lake, cores, masks, reader, kept_out)
    cmd += ["--encoding", encoding, "--warm-runs", str(warm_runs)]
    cmd += ["--interleave-masks-off"] if interleave_masks_off else []
    cmd += ["--page-cache"] if page_cache else []
    cmd += ["--writer", writer]
    env = dict(os.environ)
    if writer == "spark":
        env.setdefault("SLIDELAKE_DELTA_JARS", str(DELTA_JARS))
    try:
        return bench_json(subprocess.run(cmd, capture_output=True, text=True, check=False, env=env))
    finally:
        shutil.rmtree(lake, ignore_errors=True)


class LiveSession:
    """A slidelake session kept alive in a fresh process confined to ``cores`` CPUs: its cold run
    at start, then one warm run (into a fresh lake) per :meth:`run` call, so that runs of two
    sessions (N cores and 1 core) can alternate seconds apart instead of minutes apart. This
    VM's per-core speed drifts by tens of per cent between minutes; adjacent runs share the
    drift. An idle session holds a JVM and its Python workers, which use no CPU while waiting.
    ``kept_out``: a Parquet file for the cold run's kept tiles (:func:`load_kept`), written
    before the constructor returns.

    Raises:
        RuntimeError: the child failed (with its stderr) or a run did not succeed.
    """

    def __init__(self, slide: str | list[str], cores: int, masks: str = "on", reader: str = "auto",
                 kept_out: str | None = None) -> None:
        self.lake = tempfile.mkdtemp(prefix="slidelake-bench-")
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            child_command(slide, self.lake, cores, masks, reader, kept_out) + ["--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        try:
            self.cold = self._read()
        except BaseException:
            self.close()  # the child then reads end of input and stops its session
            raise

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("BENCH-JSON "):
                out = json.loads(line[len("BENCH-JSON "):])
                if out.get("status") != "succeeded":
                    raise RuntimeError(f"slidelake run failed: {json.dumps(out)[:2000]}")
                return out
        self._err.seek(0)
        raise RuntimeError(f"benchmark child failed ({self.proc.wait()}):\n{self._err.read()[-3000:]}")

    def run(self) -> dict:
        """One warm run: ``wall_s``, ``stage_seconds``, ``counts``, ``cpu_s``, ``idle_steal_s``."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()
        self._err.close()
        shutil.rmtree(self.lake, ignore_errors=True)


def scaling_rounds(slide: str | list[str], cores: int, rounds: int, kept: str, loop_rounds: int = 4) -> dict:
    """N cores against 1 core with the runs of the two sessions interleaved: a 1-core and an
    N-core :class:`LiveSession` (masks, native reader, raw tiles), started one after the other
    (their cold runs), then ``rounds`` rounds of one warm run on each, alternating the order
    (N, 1 / 1, N / ...), so the two runs of a round are seconds apart and share this VM's drift;
    then ``loop_rounds`` rounds of the read loop (:func:`read_limit` over the kept tiles, which
    the 1-core session's cold run writes to the Parquet file ``kept``) in N processes and in one,
    alternated the same way: the machine's own scaling at that time.

    Returns:
        ``cold`` (wall s of the two cold runs and their ratio), ``rounds`` (per round: the
        order, each warm run's wall, tiling-stage seconds, CPU seconds by process and idle/steal
        seconds, and the round's N-core / 1-core ratio of tiles per second), ``warm`` (the median
        of the rounds' ratios, the lowest and highest, the ratio of the median walls, the median
        tiling-stage ratio), ``read_loop`` (per round and median).
    """
    one = LiveSession(slide, 1, kept_out=kept)
    multi = None
    try:
        multi = LiveSession(slide, cores)
        n_one, n_multi = one.cold["counts"]["tiles_written"], multi.cold["counts"]["tiles_written"]
        out_rounds = []
        for i in range(rounds):
            order = [(cores, multi), (1, one)] if i % 2 == 0 else [(1, one), (cores, multi)]
            got = {c: sess.run() for c, sess in order}
            m, o = got[cores], got[1]
            out_rounds.append({
                "order": f"{order[0][0]}c then {order[1][0]}c",
                **{f"{c}c": {"wall_s": round(r["wall_s"], 3),
                             "tiling_s": round(r["stage_seconds"][TILING], 3),
                             "cpu_s": {k: round(v, 2) for k, v in r["cpu_s"].items()},
                             "idle_steal_s": {k: round(v, 2) for k, v in r["idle_steal_s"].items()},
                             # the workers' own seconds per stage, summed over tasks (``--profile``)
                             "worker_s": {k: round(v, 2) for k, v in (r.get("profile") or {}).items()
                                          if k.endswith(("_s", ".s")) and not k.startswith("wall.")}}
                   for c, r in ((cores, m), (1, o))},
                "ratio": round((n_multi / m["wall_s"]) / (n_one / o["wall_s"]), 3),
                # the same with each run's wall less its CPUs' steal per CPU: what the ratio would
                # be had the hypervisor not taken that time (an estimate)
                "ratio_without_steal": round(
                    (n_multi / (m["wall_s"] - m["idle_steal_s"]["steal"] / cores))
                    / (n_one / (o["wall_s"] - o["idle_steal_s"]["steal"])), 3),
                "tiling_ratio": round(o["stage_seconds"][TILING] / m["stage_seconds"][TILING], 3)})
        cold = {f"{cores}c_s": round(multi.cold["wall_s"], 2), "1c_s": round(one.cold["wall_s"], 2),
                "ratio": round((n_multi / multi.cold["wall_s"]) / (n_one / one.cold["wall_s"]), 3)}
    finally:
        one.close()
        if multi is not None:
            multi.close()
    tiles, loops = load_kept(kept), []
    for i in range(loop_rounds):
        order = [cores, 1] if i % 2 == 0 else [1, cores]
        got = {c: read_limit(tiles, (256, 256), c)["tiles_per_s_per_core"] for c in order}
        loops.append({"order": f"{order[0]}p then {order[1]}p", **{f"{c}p": round(v) for c, v in got.items()},
                      "ratio": round(got[cores] * cores / got[1], 3)})
    ratios = [r["ratio"] for r in out_rounds]
    walls = {c: median(r[f"{c}c"]["wall_s"] for r in out_rounds) for c in (cores, 1)}
    return {"cores": cores, "tiles_written": n_multi, "cold": cold, "rounds": out_rounds,
            "warm": {"median_of_rounds": round(median(ratios), 3), "lowest": min(ratios), "highest": max(ratios),
                     "ratio_of_median_walls": round((n_multi / walls[cores]) / (n_one / walls[1]), 3),
                     "median_walls_s": {f"{c}c": round(w, 3) for c, w in walls.items()},
                     "tiling_median_of_rounds": round(median(r["tiling_ratio"] for r in out_rounds), 3),
                     "without_steal_median_of_rounds": round(median(r["ratio_without_steal"] for r in out_rounds), 3)},
            "read_loop": {"rounds": loops, "median": round(median(r["ratio"] for r in loops), 3)}}


def scaling_summary(sc: dict) -> dict:
    """A :func:`scaling_rounds` result as the benchmarks' JSON documents give it: the tiles each
    run wrote, ``<N>c_over_1c`` (the ratios: warm as the median of the rounds, the lowest and highest
    round, the ratio of the median walls, the tiling stage's and without steal; cold; the read
    loop's median), the warm median walls and tiles/s/core of each session, the cold walls, and
    the rounds of slidelake and of the read loop."""
    n, w = sc["cores"], sc["warm"]
    return {
        "tiles_written": sc["tiles_written"],
        f"{n}c_over_1c": {
            "warm (median of rounds)": w["median_of_rounds"],
            "warm (lowest, highest round)": [w["lowest"], w["highest"]],
            "warm (ratio of median walls)": w["ratio_of_median_walls"],
            "warm tiling stage (median of rounds)": w["tiling_median_of_rounds"],
            "warm without steal (median of rounds)": w["without_steal_median_of_rounds"],
            "cold": sc["cold"]["ratio"],
            "read loop (median of rounds)": sc["read_loop"]["median"],
        },
        "warm_median_walls_s": w["median_walls_s"],
        "warm_tiles_per_s_per_core": {f"{c}c": round(sc["tiles_written"] / w["median_walls_s"][f"{c}c"] / c)
                                      for c in (n, 1)},
        "cold_walls_s": {k: v for k, v in sc["cold"].items() if k != "ratio"},
        "rounds": sc["rounds"],
        "read_loop_rounds": sc["read_loop"]["rounds"],
    }


def load_kept(path: str) -> list[tuple[str, np.ndarray]]:
    """The kept tiles a ``kept_out`` file lists: ``[(slide path, int64 rows x, y, level)]``
    (level-0 px), slides in path order, tiles in raster order."""
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pandas()
    return [(p, g[["level0_x", "level0_y", "level"]].to_numpy(np.int64)) for p, g in t.groupby("path", sort=True)]


# --------------------------------------------------------------------- 4. stage costs

def bench_json(proc: subprocess.CompletedProcess) -> dict:
    """The ``BENCH-JSON {...}`` line a child printed; raises with its stderr when absent."""
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON "):])
    raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def run_code(code: str) -> dict:
    """Run ``code`` in a fresh Python (its own Spark session) and return its BENCH-JSON."""
    return bench_json(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT / "src")}))

def grid_expansion(cores: int) -> dict:
    """Rows/s of :func:`slidelake.grid.expand_grid` for 4.9 million tiles (16 px tiles on a
    40,960 x 30,720 slide), forced by an aggregate over the positions."""
    code = f"""
import os, time, json
os.environ["SLIDELAKE_SPARK_MASTER"] = "local[{cores}]"
from pyspark.sql import functions as F
from slidelake.spark import get_spark
from slidelake.grid import expand_grid
spark = get_spark("grid-bench")
slides = [dict(slide_id="s%d" % i, extent_x=40960, extent_y=30720, downsample=1.0) for i in range({cores})]
g = expand_grid(spark, slides, (16, 16), (16, 16), "keep")
g.agg(F.sum("level0_x")).collect()  # warm-up
t = time.perf_counter()
r = g.agg(F.count("*"), F.sum("level0_x"), F.sum("valid_width")).collect()[0]
wall = time.perf_counter() - t
print("BENCH-JSON " + json.dumps({{"rows": r[0], "wall_s": wall, "rows_per_s": r[0] / wall}}))
"""
    return run_code(code)


def overlap_inputs(tmp: str) -> tuple[str, int, int]:
    """A 5,120 x 3,840 px overlay (label 255 on 30 % of it, in smooth tissue-like blobs: smoothed
    noise above its 70th percentile) of a 327,680 x 245,760 px slide (64 µm/px at 0.25 µm/px),
    large enough for 1.2 million 256 px tiles: ``(path, W0, H0)``."""
    from scipy import ndimage

    from slidelake.overlays import write_overlay

    field = ndimage.gaussian_filter(np.random.default_rng(0).random((3840, 5120), np.float32), 40)
    path = os.path.join(tmp, "ov.tiff")
    write_overlay(path, (field > np.percentile(field, 70)).astype(np.uint8) * 255, (64.0, 64.0))
    return path, 40960 * 8, 30720 * 8


def mask_overlap(n_tiles: int = 1_000_000) -> dict:
    """Tiles/s of the overlap function alone (:func:`slidelake.overlap.slide_overlap`, Arrow
    in and out) on one core, in-process, for ``n_tiles`` 256 px tiles of :func:`overlap_inputs`."""
    import pyarrow as pa

    from slidelake.overlap import SlideInputs, slide_overlap

    tmp = tempfile.mkdtemp()
    path, W0, H0 = overlap_inputs(tmp)
    side = int(np.sqrt(n_tiles))
    yy, xx = np.mgrid[0:side, 0:side]
    rows = pa.record_batch({"slide_id": pa.array(["s"] * side * side), "level0_x": (xx.ravel() * 256).astype(np.int64),
                            "level0_y": (yy.ravel() * 256).astype(np.int64),
                            "valid_width": np.full(side * side, 256, np.int32),
                            "valid_height": np.full(side * side, 256, np.int32)})
    slide = SlideInputs(W0, H0, 1.0, path)
    slide_overlap(rows.slice(0, 1000), slide, None, 0.5)  # load the overlay once (cached per worker)
    t = time.perf_counter()
    out = slide_overlap(rows, slide, None, 0.5)
    wall = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)
    assert out.column("tissue_fraction").null_count == 0
    return {"tiles": rows.num_rows, "wall_s": wall, "tiles_per_s": rows.num_rows / wall}


def overlap_stage(cores: int) -> dict:
    """Tiles/s of the grid + overlap stage through Spark on ``local[cores]``, as the pipeline
    runs it (per-tile grid columns to a ``mapInArrow`` task, the grid split in row bands, the
    tiles with tissue fraction >= 0.5 back): 1,228,800 tiles of 256 px of
    :func:`overlap_inputs`, one slide, forced by an aggregate over the kept tiles' tissue
    fractions; the second of two runs (the first warms the JVM)."""
    tmp = tempfile.mkdtemp()
    path, W0, H0 = overlap_inputs(tmp)
    code = f"""
import os, time, json
os.environ["SLIDELAKE_SPARK_MASTER"] = "local[{cores}]"
from pyspark.sql import functions as F
from slidelake.spark import get_spark
from slidelake.grid import expand_grid, grid_shape, row_bands
from slidelake.overlap import SlideInputs, overlap_tiles
from slidelake.pipeline import GRID_TILES_PER_TASK
spark = get_spark("overlap-bench")
g = expand_grid(spark, [dict(slide_id="s", extent_x={W0}, extent_y={H0}, downsample=1.0)], (256, 256), (256, 256),
                "keep", None, GRID_TILES_PER_TASK)
o = overlap_tiles(g, {{"s": SlideInputs({W0}, {H0}, 1.0, {path!r})}}, None, 0.5, 0.5)
walls = []
for _ in range(2):
    t = time.perf_counter()
    r = o.agg(F.count("*"), F.sum("tissue_fraction")).collect()[0]
    walls.append(time.perf_counter() - t)
nx, ny = grid_shape({W0}, {H0}, 1.0, (256, 256), (256, 256), "keep")
n, bands = nx * ny, len(row_bands(ny, nx * ny, GRID_TILES_PER_TASK))
print("BENCH-JSON " + json.dumps({{"tiles": n, "kept": r[0], "tasks": bands, "wall_s": walls[-1],
                                   "tiles_per_s": n / walls[-1], "tiles_per_s_per_core": n / walls[-1] / {cores}}}))
"""
    try:
        return run_code(code)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def encodings(slide: str, coords: np.ndarray, n: int = 200) -> list[dict]:
    """ms/tile to encode and bytes/tile per format on ``n`` kept tiles of the slide."""
    import openslide

    from slidelake.decode import read_tile
    from slidelake.encoding import encode_tile

    with openslide.OpenSlide(slide) as s:
        pick = coords[np.linspace(0, len(coords) - 1, min(n, len(coords))).astype(int)]
        tiles = [read_tile(s, x, y, lv, (256, 256), (256, 256), (256, 256)) for x, y, lv in pick]
    out = []
    for fmt, q in (("raw", 0), ("png", 0), ("jpeg", 90), ("webp", 90)):
        t = time.perf_counter()
        sizes = [len(encode_tile(rgb, fmt, q)) for rgb in tiles]
        out.append({"format": fmt if fmt in ("raw", "png") else f"{fmt} q{q}",
                    "ms_per_tile": (time.perf_counter() - t) / len(tiles) * 1000,
                    "bytes_per_tile": float(np.mean(sizes))})
    return out


# ----------------------------------------------------------------------------- report

def table(rows: list[list], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(res: dict) -> str:
    m, c = res["machine"], res["cores"]
    lim, naive = res["read_limit"], res["naive"]
    runs = res["slidelake"]
    lines = [f"Run {res['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; Python {m['python']}, "
             f"PySpark {m['pyspark']}, OpenSlide {m['openslide']}. Slide: SYNTHETIC {res['slide']['width']} x "
             f"{res['slide']['height']} px Aperio-style SVS at 0.25 µm/px, 256 px JPEG tiles, tissue ellipses over "
             f"{res['slide']['tissue_area_fraction']:.0%} of the area; level 0, 256 px tiles, raw encoding, "
             f"{lim['tiles']} kept tiles (>= 50 % tissue). N = {c} cores.", ""]
    if res.get("memory"):
        mm = res["memory"]
        lines += [f"Fresh memory on this machine: writing into memory just allocated takes "
                  f"{mm['first_touch_s_per_gib']:.2f} s/GiB, into the same memory again {mm['again_s_per_gib']:.2f} s/GiB. "
                  f"Every page of tiles written through the page cache is new memory: "
                  f"{mm['first_touch_ms_per_raw_tile']:.2f} ms per raw 256 px tile (192 KiB) beyond the copy"
                  + (" (this VM's balloon device reports freed memory back to the host)"
                     if m.get("free_page_reporting") else "")
                  + ". slidelake's workers write their tile files around it (`tables.direct_io`); the run "
                    "`page cache` below writes them through it.", ""]
    lim_rate = lim["tiles_per_s_per_core"]
    spread = lim.get("runs_tiles_per_s_per_core") or [lim_rate]
    lines += [f"Read limit measured {len(spread)} times in this run (start, middle, end): "
              + ", ".join(f"{v:.0f}" for v in spread) + " tiles/s/core; the median is the reference below.", ""]
    rows = [["read limit (`read_region` loop, median)", c, lim["tiles"], f"{lim['wall_s']:.1f}", f"{lim_rate:.0f}", "1.00", "", "", ""],
            ["naive baseline (ProcessPoolExecutor)", c, naive["tiles"], f"{naive['wall_s']:.1f}",
             f"{naive['tiles_per_s_per_core']:.0f}", f"{naive['tiles_per_s_per_core'] / lim_rate:.2f}", "", "", ""]]
    for name, r in runs.items():
        w = r["warm"]
        rows.append([f"slidelake: {name}", r["cores"], r["counts"]["tiles_written"], f"{r['wall_s']:.1f}",
                     f"{r['tiles_per_s_per_core']:.0f}", f"{r['tiles_per_s_per_core'] / lim_rate:.2f}",
                     f"{w['wall_s']:.1f}", f"{w['tiles_per_s_per_core'] / lim_rate:.2f}",
                     ", ".join(f"{x:.1f}" for x in w.get("walls_s", [w["wall_s"]]))])
    lines.append(table(rows, ["what", "cores", "tiles", "wall s", "tiles/s/core", "x read limit",
                              "warm wall s (median)", "warm x read limit", "warm runs s"]))
    best = runs["masks, native reader"]

    def ratios(key: str) -> list[str]:
        def g(name: str, of: dict = runs) -> dict:
            return of[name] if key == "cold" else of[name]["warm"]

        def scaling(multi_s: float, single_s: float) -> float:  # tiles/s on N cores / on 1 core
            return (n_b / multi_s) / (n_one / single_s)

        b, one = g("masks, native reader"), g("masks, 1 core")
        n_b, n_one = best["counts"]["tiles_written"], runs["masks, 1 core"]["counts"]["tiles_written"]
        speedup = scaling(b["wall_s"], one["wall_s"])
        mask_first = b['wall_s'] / g('no masks (pixel filter)')['wall_s']
        mask_note = scale_note = ""
        tiling = one["stage_seconds"][TILING] / b["stage_seconds"][TILING]
        if key == "warm" and best.get("warm_masks_off"):
            # warm runs with and without masks alternated in one session (see slidelake_child)
            sep = mask_first
            mask_first = median(b["walls_s"]) / median(best["warm_masks_off"]["walls_s"])
            mask_note = (f" (runs with and without masks alternated in one session, medians "
                         f"{median(b['walls_s']):.1f} / {median(best['warm_masks_off']['walls_s']):.1f} s; "
                         f"from separate sessions: {sep:.2f})")
        sc = res.get("scaling")  # scaling_rounds: warm runs of a 1-core and an N-core session interleaved
        if sc:
            if key == "warm":
                w = sc["warm"]
                sessions, speedup, tiling = speedup, w["median_of_rounds"], w["tiling_median_of_rounds"]
                scale_note = (f"; median of {len(sc['rounds'])} rounds of one warm run in a 1-core session and one "
                              f"in an N-core session kept alive side by side, alternating which goes first: "
                              f"{w['lowest']:.2f}x-{w['highest']:.2f}x, ratio of their median walls "
                              f"{w['ratio_of_median_walls']:.2f}x; the separate sessions' median warm runs: {sessions:.2f}x")
            else:
                scale_note = f"; the interleaved sessions' cold runs: {sc['cold']['ratio']:.2f}x"
        return [
            f"- slidelake end to end / read limit: **{b['tiles_per_s_per_core'] / lim_rate:.2f}x** "
            f"(with `decode.reader=openslide`: {g('masks, openslide reader')['tiles_per_s_per_core'] / lim_rate:.2f}x"
            + (f"; storing `jpeg` tiles: {g('masks, native reader, jpeg')['tiles_per_s_per_core'] / lim_rate:.2f}x"
               if "masks, native reader, jpeg" in runs else "")
            + (f"; tile files written through the page cache: "
               f"{g('masks, native reader, page cache')['tiles_per_s_per_core'] / lim_rate:.2f}x"
               if "masks, native reader, page cache" in runs else "")
            + (f"; committed by Spark's Delta writer: "
               f"{g('masks, native reader, Spark Delta writer')['tiles_per_s_per_core'] / lim_rate:.2f}x"
               if "masks, native reader, Spark Delta writer" in runs else "") + ")",
            f"- slidelake / naive baseline: **{b['tiles_per_s_per_core'] / naive['tiles_per_s_per_core']:.1f}x**",
            f"- mask-first wall time / the same run without masks: **{mask_first:.2f}**{mask_note}",
            f"- {c} cores / 1 core (tiles per second): **{speedup:.2f}x** "
            f"(tiling stage alone: {tiling:.2f}x; "
            f"each run confined to its cores{scale_note})",
        ]

    one_proc = res.get("read_limit_one_process")
    if one_proc:
        mid = spread[1] if len(spread) > 1 else lim_rate
        lines += ["", f"The read loop itself on {c} processes / 1 process: **{mid * c / one_proc['tiles_per_s_per_core']:.2f}x** "
                  f"({mid:.0f} and {one_proc['tiles_per_s_per_core']:.0f} tiles/s/core, measured one after the other): "
                  f"this machine's own scaling of a CPU-bound loop, the ceiling of slidelake's"
                  + (f"; alternated {len(res['scaling']['read_loop']['rounds'])} times after the interleaved runs: "
                     f"{res['scaling']['read_loop']['median']:.2f}x (median; "
                     + ", ".join(f"{r['ratio']:.2f}x" for r in res["scaling"]["read_loop"]["rounds"]) + ")"
                     if res.get("scaling") else "") + "."]
    cpu = {name: runs[name]["warm"].get("cpu_s") for name in ("masks, native reader", "masks, 1 core") if name in runs}
    if all(cpu.values()) and len(cpu) == 2:
        n_cpu, one_cpu = cpu["masks, native reader"], cpu["masks, 1 core"]
        walls = (best["warm"]["wall_s"], runs["masks, 1 core"]["warm"]["wall_s"])
        lines += ["", f"CPU of the median warm run on {c} cores / on 1 core (`/proc`, user + system): "
                  + ", ".join(f"{label} {n_cpu[k]:.2f} / {one_cpu[k]:.2f} s" for k, label in
                              (("python_workers", "Python workers"), ("jvm", "JVM"), ("driver", "driver Python")))
                  + f"; in all {sum(n_cpu.values()):.2f} s in {walls[0]:.2f} s of wall time on {c} cores "
                    f"({sum(n_cpu.values()) / walls[0] / c:.0%} busy) and {sum(one_cpu.values()):.2f} s in "
                    f"{walls[1]:.2f} s on 1 core ({sum(one_cpu.values()) / walls[1]:.0%} busy)."]
        idle_steal = (best["warm"].get("idle_steal_s"), runs["masks, 1 core"]["warm"].get("idle_steal_s"))
        if all(idle_steal):
            lines[-1] += (f" The run's CPUs were idle {idle_steal[0]['idle']:.2f} / {idle_steal[1]['idle']:.2f} s and the "
                          f"hypervisor took {idle_steal[0]['steal']:.2f} / {idle_steal[1]['steal']:.2f} s of them (steal: "
                          f"this VM's disk writes, done by the host on the busy vCPUs' time).")
    lines += ["", "Ratios, first run in a fresh Spark session (cold: includes Spark's one-off first-job warm-up):", "",
              *ratios("cold"), "",
              "Ratios, the same run again in the same session into a fresh lake (warm: the per-run cost; median of the warm runs):", "",
              *ratios("warm"), ""]
    st = res["stages"]
    prof = best["warm"]["profile"]
    written_mb = prof.get("write.bytes", best["counts"]["tiles_written"] * 256 * 256 * 3) / 1e6
    commit = (f"{prof['write.commit_s']:.2f} s for {prof['write.files']:.0f} files (the data written in all: "
              f"{written_mb / (prof['write.s'] / c + prof['write.commit_s']):,.0f} MB/s on {c} cores)"
              if "write.commit_s" in prof else
              f"part of the tiling stage's {best['warm']['stage_seconds'][TILING]:.1f} s (warm)")
    lines.append(table([
        ["grid expansion", f"{st['grid']['rows']:,} rows", f"{st['grid']['rows_per_s']:,.0f} rows/s ({c} cores)"],
        ["mask overlap: the function alone (in-process)", f"{st['overlap']['tiles']:,} tiles",
         f"{st['overlap']['tiles_per_s']:,.0f} tiles/s (1 core)"],
        ["mask overlap: grid + overlap stage through Spark", f"{st['overlap_stage']['tiles']:,} tiles",
         f"{st['overlap_stage']['tiles_per_s_per_core']:,.0f} tiles/s per core "
         f"({st['overlap_stage']['tiles_per_s']:,.0f} on {c} cores, {st['overlap_stage']['tasks']} bands, "
         f"{st['overlap_stage']['kept']:,} tiles kept)"],
        ["decode in the workers (read + stats + encode)", f"{prof['decode.tiles']:,.0f} tiles",
         f"{prof['decode.batch_s'] / prof['decode.tiles'] * 1000:.2f} ms/tile per core"],
        ["tile Parquet write in the workers (pyarrow)", f"{written_mb:,.0f} MB",
         f"{written_mb / prof['write.s']:,.0f} MB/s per core"],
        ["Delta commit (delta-rs, driver)", f"{best['counts']['tiles_written']:,} rows", commit],
    ], ["stage", "size", "rate"]))
    lines += ["", table([[e["format"], f"{e['ms_per_tile']:.2f}", f"{e['bytes_per_tile'] / 1024:.1f}"] for e in st["encoding"]],
                        ["encoding (256 px tile)", "ms/tile", "KiB/tile"]), ""]
    def stage_peaks(r: dict) -> list[str]:
        p = {**(r.get("profile") or {})}
        for k, v in (r["warm"].get("profile") or {}).items():
            p[k] = max(p.get(k, 0.0), v) if k.endswith("_peak_mib") else p.get(k, v)
        return [f"{p[k]:.0f}" if p.get(k) else "" for k in
                ("masks.worker_peak_mib", "overlap.worker_peak_mib", "decode.worker_peak_mib")]

    mem = [[name, f"{r['peak_rss_mib']['python_worker_max']:.0f}", *stage_peaks(r), f"{r['peak_rss_mib']['driver_python']:.0f}",
            f"{r['peak_rss_mib']['driver_jvm']:.0f}"] for name, r in list(runs.items()) + [("small real slide (CMU), masks", res["small"])]]
    mem.append(["naive baseline (driver)", "", "", "", "", f"{naive['driver_peak_rss_mib']:.0f}", ""])
    lines.append(table(mem, ["peak RSS (MiB)", "Python worker", "in masks", "in overlap", "in decode + write",
                             "driver Python", "driver JVM"]))
    big, small = runs["masks, native reader"]["peak_rss_mib"]["python_worker_max"], res["small"]["peak_rss_mib"]["python_worker_max"]
    lines += ["", "A single slide's mask is made on the driver (`masks.on_driver_below`), so the masks stage's memory "
              "is in the driver Python column here.", "",
              f"Python worker peak, large slide / small slide: **{big / small:.2f}** ({big:.0f} vs {small:.0f} MiB)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=40960)
    ap.add_argument("--height", type=int, default=30720)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--slides", nargs="+", metavar="PATH",
                    help="your own slides (files, folders, globs, a manifest): the same comparison on them "
                         "(bench/real_slides.py) instead of the synthetic slide; docs/ is not rewritten")
    # child mode (one slidelake run in a fresh process)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slide", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--lake", help=argparse.SUPPRESS)
    ap.add_argument("--masks", default="on", help=argparse.SUPPRESS)
    ap.add_argument("--reader", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--encoding", default="raw", help=argparse.SUPPRESS)
    ap.add_argument("--kept-out", help=argparse.SUPPRESS)
    ap.add_argument("--page-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--writer", default="delta-rs", help=argparse.SUPPRESS)
    ap.add_argument("--interleave-masks-off", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm-runs", type=int, default=3, help="warm runs per configuration (the median is reported)")
    ap.add_argument("--scaling-rounds", type=int, default=8,
                    help="rounds of interleaved warm runs on N cores and on 1 core (scaling_rounds)")
    args = ap.parse_args()
    if args.child:
        slidelake_child(args)
        return
    if args.slides:
        import real_slides

        real_slides.main([*args.slides, "--cores", str(args.cores), "--warm-runs", str(args.warm_runs)])
        return

    from make_slide import make_slide

    cores = args.cores
    slide = HERE / "data" / f"synthetic-{args.width}x{args.height}.svs"
    if not slide.exists():
        print(f"making {slide} ...", flush=True)
        make_slide(slide, args.width, args.height)
    info = {"width": args.width, "height": args.height, "tissue_area_fraction": 0.3, "synthetic": True}
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "cores": cores, "slide": info,
                 "memory": memory_first_touch()}
    kept = str(HERE / "data" / "kept.parquet")
    runs = {}
    print("slidelake: masks, native reader ...", flush=True)
    runs["masks, native reader"] = run_slidelake(str(slide), cores, "on", "auto", kept_out=kept, warm_runs=args.warm_runs,
                                                 interleave_masks_off=True)
    tiles = load_kept(kept)
    coords = tiles[0][1]
    print(f"read limit over {len(coords)} kept tiles ...", flush=True)
    # this VM's speed drifts by 20-30 % within a run: the read limit is measured three times
    # (start, middle, end) and the median is the reference of every ratio
    limits = [read_limit(tiles, (256, 256), cores)]
    print("naive baseline ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["naive"] = naive_baseline(tiles, (256, 256), cores, os.path.join(tmp, "naive.parquet"))
    print("slidelake: other runs ...", flush=True)
    runs["masks, openslide reader"] = run_slidelake(str(slide), cores, "on", "openslide", warm_runs=args.warm_runs)
    runs["no masks (pixel filter)"] = run_slidelake(str(slide), cores, "off", "auto", warm_runs=args.warm_runs)
    # the same run storing JPEG tiles (7x fewer bytes to write than raw)
    runs["masks, native reader, jpeg"] = run_slidelake(str(slide), cores, "on", "auto", warm_runs=args.warm_runs,
                                                       encoding="jpeg")
    # the same run writing its tile files through the page cache (tables.direct_io=false)
    runs["masks, native reader, page cache"] = run_slidelake(str(slide), cores, "on", "auto", warm_runs=args.warm_runs,
                                                             page_cache=True)
    if any(DELTA_JARS.glob("delta-spark_*.jar")):  # the same run committed by Spark's Delta writer
        runs["masks, native reader, Spark Delta writer"] = run_slidelake(str(slide), cores, "on", "auto",
                                                                      warm_runs=args.warm_runs, writer="spark")
    limits.append(read_limit(tiles, (256, 256), cores))
    # the machine's own N-core scaling of a CPU-bound loop, next to the N-core measurement
    res["read_limit_one_process"] = read_limit(tiles, (256, 256), 1)
    runs["masks, 1 core"] = run_slidelake(str(slide), 1, "on", "auto", warm_runs=args.warm_runs)
    res["slidelake"] = runs
    # N cores / 1 core: the two sessions above are minutes apart and this VM drifts by tens of
    # per cent between minutes, so the warm ratio comes from runs of two live sessions interleaved
    print("slidelake: N cores / 1 core, interleaved warm runs ...", flush=True)
    res["scaling"] = scaling_rounds(str(slide), cores, args.scaling_rounds, kept)
    res["small"] = run_slidelake(str(CMU), cores, "on", "auto", warm_runs=args.warm_runs)
    limits.append(read_limit(tiles, (256, 256), cores))
    res["read_limit"] = {**sorted(limits, key=lambda r: r["wall_s"])[1],
                         "runs_tiles_per_s_per_core": [r["tiles_per_s_per_core"] for r in limits]}
    print("stage costs ...", flush=True)
    res["stages"] = {"grid": grid_expansion(cores), "overlap": mask_overlap(), "overlap_stage": overlap_stage(cores),
                     "encoding": encodings(str(slide), coords)}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    text = report(res)
    print(text)
    md = ROOT / "docs" / "benchmarks.md"
    if not args.no_docs and md.exists():
        doc = md.read_text()
        a, b = doc.index("<!-- results -->"), doc.index("<!-- /results -->")
        md.write_text(doc[:a] + "<!-- results -->\n" + text + "\n" + doc[b:])


if __name__ == "__main__":
    main()
