"""The benchmark's own code: the read limit and naive baseline over several slides, and the
comparison on real slides a user passes (``bench/throughput.py --slides``)."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CMU, DAPI, ROOT, need

sys.path.insert(0, str(ROOT / "bench"))

import real_slides  # noqa: E402
import throughput as tp  # noqa: E402


def _tiles(n_a: int, n_b: int) -> list[tuple[str, np.ndarray]]:
    a = np.stack([np.arange(n_a) * 256, np.zeros(n_a), np.zeros(n_a)], axis=1).astype(np.int64)
    b = np.stack([np.zeros(n_b), np.arange(n_b) * 256, np.zeros(n_b)], axis=1).astype(np.int64)
    return [("a.svs", a), ("b.svs", b)]


@pytest.mark.parametrize("n_a, n_b, parts", [(7, 4, 2), (1, 0, 3), (10, 10, 3), (3, 5, 8)])
def test_split_tiles_cuts_in_order_into_equal_contiguous_chunks(n_a, n_b, parts):
    tiles = [(p, c) for p, c in _tiles(n_a, n_b) if len(c)]
    chunks = tp.split_tiles(tiles, parts)
    assert len(chunks) == parts
    sizes = [sum(len(c) for _, c in ch) for ch in chunks]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n_a + n_b
    # read back in chunk order, the chunks are the tiles in their order, each slide once per chunk
    flat = [(p, tuple(r)) for ch in chunks for p, c in ch for r in c]
    assert flat == [(p, tuple(r)) for p, c in tiles for r in c]
    assert all(len({p for p, _ in ch}) == len(ch) for ch in chunks)


def test_subset_keeps_order_and_spreads_over_the_slides():
    tiles = _tiles(30, 10)
    sub = real_slides.subset(tiles, 8)
    assert sum(len(c) for _, c in sub) == 8
    assert [p for p, _ in sub] == ["a.svs", "b.svs"]  # both slides, evenly spaced
    for p, c in sub:
        full = dict(tiles)[p]
        idx = [int(np.flatnonzero((full == r).all(axis=1))[0]) for r in c]
        assert idx == sorted(idx)
    assert real_slides.subset(tiles, 100) is tiles


def test_read_limit_and_naive_baseline_over_two_real_slides(tmp_path):
    need(CMU, DAPI)
    import openslide

    tiles = [(str(CMU), np.array([[0, 0, 0], [256, 512, 0], [1024, 2048, 0]], np.int64)),
             (str(DAPI), np.array([[512, 512, 0], [768, 512, 0]], np.int64))]
    lim = tp.read_limit(tiles, (256, 256), 2)
    assert lim["tiles"] == 5 and lim["tiles_per_s_per_core"] > 0
    out = tmp_path / "naive.parquet"
    naive = tp.naive_baseline(tiles, (256, 256), 2, str(out))
    assert naive["tiles"] == 5
    t = pq.read_table(out).to_pydict()
    assert t["path"] == [str(CMU)] * 3 + [str(DAPI)] * 2
    for path, x, y, pix in zip(t["path"], t["x"], t["y"], t["tile"]):
        ref = np.asarray(openslide.OpenSlide(path).read_region((x, y), 0, (256, 256)).convert("RGB"))
        assert pix == ref.tobytes()


def test_real_slides_comparison_reports_kept_tiles_and_a_broken_slide(tmp_path):
    """End to end on a folder with one real slide and one corrupt file: slidelake runs (in its own
    process), the broken file is reported with its error, the read limit and the naive baseline
    read exactly the tiles slidelake kept."""
    need(CMU)
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "cmu.svs").symlink_to(CMU)
    (folder / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 500)
    res = real_slides.run([str(folder)], 2, 1, naive_max_tiles=20)
    sl = res["slidelake"]
    assert sl["status"] == "succeeded"
    status = {r["path"].rsplit("/", 1)[1]: r for r in sl["slides"]}
    assert status["cmu.svs"]["status"] == "ok" and status["cmu.svs"]["vendor"] == "aperio"
    assert status["broken.svs"]["status"] == "error" and status["broken.svs"]["error"]
    kept = res["kept_tiles"]
    assert list(kept.values()) == [sl["counts"]["tiles_written"]] and sl["counts"]["tiles_written"] > 20
    assert res["read_limit"]["tiles"] == sl["counts"]["tiles_written"]
    assert res["naive"]["tiles"] == 20  # capped, evenly spaced
    text = real_slides.report(res)
    broken_row = next(line for line in text.splitlines() if line.startswith("| broken.svs"))
    assert "| error | 0 |" in broken_row
    assert f"evenly spaced 20 of the {sl['counts']['tiles_written']} kept tiles" in text


def test_report_of_a_run_that_kept_no_tiles():
    res = {"date": "2026-11-22", "cores": 2, "inputs": ["/x"], "kept_tiles": {},
           "machine": {"cpu": "cpu", "cores": 2, "memory_mib": 1, "python": "3", "pyspark": "4", "openslide": "4"},
           "slidelake": {"slides": [{"path": "/x/a.svs", "status": "error", "error": "ValueError: not a slide"}],
                         "slide_errors": [{"stage": "discover", "path": "/x/a.svs", "error": "ValueError: not a slide"},
                                          {"stage": "masks", "path": "/x/b.svs", "error": "OSError: short read"}]}}
    text = real_slides.report(res)
    assert "| a.svs |  |  |  | none | error | 0 | ValueError: not a slide |" in text
    assert "- masks failed for b.svs: OSError: short read" in text and "discover failed" not in text
    assert text.endswith("No tiles were kept, so there is nothing to compare against the read limit.")


def test_profile_worker_decodes_the_kept_tiles_of_a_bench_run(tmp_path, capsys):
    """``bench/profile_worker.py`` reads the kept-tiles file a benchmark run writes and profiles
    the pipeline's decoder on those tiles; a tile of a file that is gone fails and is counted."""
    need(CMU)
    import pandas as pd
    import profile_worker

    kept = tmp_path / "kept.parquet"
    pd.DataFrame({"path": [str(CMU)] * 3 + [str(tmp_path / "gone.svs")], "level0_x": [0, 256, 512, 0],
                  "level0_y": [0, 0, 1024, 0], "level": [0, 0, 0, 0]}).to_parquet(kept)
    res = profile_worker.main(["--kept", str(kept), "--tiles", "10"])
    assert res["tiles"] == 4 and res["decoded"] == 3 and res["failed"] == 1 and res["ms_per_tile"] > 0
    out = capsys.readouterr().out
    assert out.startswith("4 tiles, reader=auto, encoding=raw:") and "1 failed" in out and "tottime" in out


def test_memory_first_touch_reports_both_passes_and_the_cost_per_raw_tile():
    m = tp.memory_first_touch(16, settle_s=0)
    assert m["first_touch_s_per_gib"] > 0 and m["again_s_per_gib"] > 0
    # a raw 256 px tile is 192 KiB: 192 / 1024**2 of a GiB
    assert m["first_touch_ms_per_raw_tile"] == pytest.approx(m["first_touch_s_per_gib"] * 196608 / 2**30 * 1000)


@pytest.mark.parametrize("devices, expected", [
    ({"virtio0": ("0x0005", "0110010100"), "virtio1": ("0x0002", "0010001001")}, True),  # balloon, bit 5 set
    ({"virtio0": ("0x0005", "0110000100")}, False),  # balloon without free page reporting
    ({"virtio1": ("0x0002", "0010011001")}, None),  # a disk, no balloon
])
def test_free_page_reporting_reads_the_balloon_feature_bit(tmp_path, devices, expected):
    for name, (device, features) in devices.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "device").write_text(device + "\n")
        (tmp_path / name / "features").write_text(features + "\n")
    assert tp.free_page_reporting(str(tmp_path)) is expected


def test_folder_scaling_measures_n_cores_against_one_on_a_folder(tmp_path):
    """``bench/folder_scaling.py`` end to end on a small folder: it builds distinct synthetic
    slides, runs slidelake in a 2-core and a 1-core live session, interleaves their warm runs
    in both orders, and reports the rounds, the ratios and the read loop over the tiles
    slidelake kept."""
    need(CMU)
    import json
    from statistics import median

    import folder_scaling

    out = tmp_path / "scaling.json"
    res = folder_scaling.main(["--slides", "2", "--width", "2048", "--height", "1536", "--cores", "2",
                               "--rounds", "2", "--loop-rounds", "2", "--data", str(tmp_path), "--out", str(out)])
    folder = tmp_path / "folder-2048x1536"
    files = sorted(folder.glob("synthetic-*.svs"))
    assert [f.name for f in files] == ["synthetic-1.svs", "synthetic-2.svs"]
    assert files[0].read_bytes() != files[1].read_bytes()  # seeds give different slides
    assert json.loads(out.read_text()) == res
    assert res["tiles_written"] > 0
    rounds, ratios = res["rounds"], res["2c_over_1c"]
    assert [r["order"] for r in rounds] == ["2c then 1c", "1c then 2c"]
    for r in rounds:
        two, one = r["2c"], r["1c"]
        assert r["ratio"] == pytest.approx(one["wall_s"] / two["wall_s"], rel=0.01)  # same tiles on both
        assert r["tiling_ratio"] == pytest.approx(one["tiling_s"] / two["tiling_s"], rel=0.01)
        assert 0 < two["tiling_s"] < two["wall_s"] and two["worker_s"]["decode.read_s"] > 0
        # the workers decode every tile: their CPU is most of a run's and at least what they timed
        assert one["cpu_s"]["python_workers"] >= 0.8 * one["worker_s"]["decode.read_s"] > 0
        assert one["cpu_s"]["jvm"] > 0 and one["cpu_s"]["driver"] > 0
        # each session's CPUs: idle for part of a run, never longer than the run; steal never negative
        for s, cpus in ((one, 1), (two, 2)):
            assert 0 <= s["idle_steal_s"]["idle"] < s["wall_s"] * cpus and s["idle_steal_s"]["steal"] >= 0
        assert r["ratio_without_steal"] >= r["ratio"] - 0.05
    assert ratios["warm (median of rounds)"] == pytest.approx(median(r["ratio"] for r in rounds), abs=0.001)
    assert ratios["warm (lowest, highest round)"] == [min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)]
    walls = res["warm_median_walls_s"]
    assert walls["2c"] == pytest.approx(median(r["2c"]["wall_s"] for r in rounds), abs=0.001)
    assert ratios["warm (ratio of median walls)"] == pytest.approx(walls["1c"] / walls["2c"], rel=0.01)
    assert ratios["cold"] == pytest.approx(res["cold_walls_s"]["1c_s"] / res["cold_walls_s"]["2c_s"], rel=0.02)
    loops = res["read_loop_rounds"]
    assert [lp["order"] for lp in loops] == ["2p then 1p", "1p then 2p"]
    for lp in loops:
        assert lp["ratio"] == pytest.approx(2 * lp["2p"] / lp["1p"], rel=0.02)
    assert ratios["read loop (median of rounds)"] == pytest.approx(median(lp["ratio"] for lp in loops), abs=0.001)
    # the kept tiles the read loop read are the 1-core session's cold run's
    assert sum(len(c) for _, c in tp.load_kept(str(tmp_path / "kept-folder-2x2048x1536.parquet"))) == res["tiles_written"]


def test_throughput_report_takes_the_warm_core_ratio_from_the_interleaved_rounds():
    """With ``scaling`` (:func:`throughput.scaling_rounds`) in the results, the warm N-core / 1-core
    ratio is the median of its rounds, with the rounds' range, and the cold line adds its cold
    runs; the read-loop line adds the alternated loop's median."""
    import json

    res = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    res["scaling"] = {
        "cores": 2, "tiles_written": 5753, "cold": {"2c_s": 9.0, "1c_s": 15.3, "ratio": 1.7},
        "rounds": [{"ratio": 1.5}, {"ratio": 1.81}, {"ratio": 1.93}],
        "warm": {"median_of_rounds": 1.81, "lowest": 1.5, "highest": 1.93, "ratio_of_median_walls": 1.78,
                 "median_walls_s": {"2c": 3.3, "1c": 5.9}, "tiling_median_of_rounds": 1.9,
                 "without_steal_median_of_rounds": 1.81},
        "read_loop": {"rounds": [{"ratio": 1.97}, {"ratio": 1.87}], "median": 1.92}}
    lines = [ln for ln in tp.report(res).splitlines() if ln.startswith("- 2 cores / 1 core")]
    cold, warm = lines
    assert cold.startswith("- 2 cores / 1 core (tiles per second): **") and "interleaved sessions' cold runs: 1.70x" in cold
    assert warm.startswith("- 2 cores / 1 core (tiles per second): **1.81x** (tiling stage alone: 1.90x;")
    assert "median of 3 rounds" in warm and "1.50x-1.93x" in warm and "ratio of their median walls 1.78x" in warm
    assert "alternated 2 times after the interleaved runs: 1.92x (median; 1.97x, 1.87x)" in tp.report(res)


def test_large_slide_check_measures_one_slide_and_its_core_scaling_in_interleaved_rounds(tmp_path):
    """``bench/large_slide.py`` end to end on a small synthetic slide: two slidelake processes
    bracketed by the read limit, the mask-first ratio from alternated warm runs, and N cores
    against 1 from interleaved rounds of two live sessions (``throughput.scaling_rounds``), all
    over the same kept tiles; the JSON document is written to ``--out``."""
    need(CMU)
    import json
    from statistics import median

    import large_slide

    out = tmp_path / "large.json"
    res = large_slide.main(["--width", "2048", "--height", "1536", "--cores", "2", "--rounds", "2",
                            "--loop-rounds", "1", "--no-mask-off", "--no-jpeg", "--data", str(tmp_path),
                            "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert (tmp_path / "synthetic-2048x1536.svs").is_file()
    first, second = res["runs"]
    kept = sum(len(c) for _, c in tp.load_kept(str(tmp_path / "kept-2048x1536.parquet")))
    assert kept == first["tiles_written"] == second["tiles_written"] == res["scaling"]["tiles_written"] > 0
    assert len(res["read_limit_tiles_per_s_per_core"]) == 2 and min(res["read_limit_tiles_per_s_per_core"]) > 0
    # every ratio against both read-limit measurements
    assert res["x_read_limit"]["run 1 warm"] == [round(first["warm"]["tiles_per_s_per_core"] / r, 2)
                                                 for r in res["read_limit_tiles_per_s_per_core"]]
    mf = res["mask_first"]
    assert len(mf["warm_walls_s"]["masks"]) == len(mf["warm_walls_s"]["no masks"]) == 2
    assert mf["warm"] == pytest.approx(median(mf["warm_walls_s"]["masks"]) / median(mf["warm_walls_s"]["no masks"]),
                                       abs=0.011)  # the ratio is rounded to 0.01
    assert "no_masks" not in res and "jpeg" not in res  # --no-mask-off, --no-jpeg
    assert max(first["warm"]["worker_peaks_mib"].values()) > 0
    sc = res["scaling"]
    rounds, ratios = sc["rounds"], sc["2c_over_1c"]
    assert [r["order"] for r in rounds] == ["2c then 1c", "1c then 2c"]
    assert ratios["warm (median of rounds)"] == pytest.approx(median(r["ratio"] for r in rounds), abs=0.001)
    assert ratios["cold"] == pytest.approx(sc["cold_walls_s"]["1c_s"] / sc["cold_walls_s"]["2c_s"], rel=0.02)
    assert [lp["order"] for lp in sc["read_loop_rounds"]] == ["2p then 1p"]
    assert sc["warm_tiles_per_s_per_core"]["1c"] == round(kept / sc["warm_median_walls_s"]["1c"])
