"""Discovery on the real slides, plus broken and duplicate files."""

import os
import shutil

import openslide
import polars as pl
import pytest

from conftest import CMU, DAPI, TCGA, TRITC, make_tiff, need
from slidelake.config import PipelineConfig
from slidelake.pipeline import run_discover
from slidelake.slides import discover, fingerprint_file, list_inputs, probe_slide


def test_probe_matches_openslide_on_real_slides():
    need(CMU, TCGA, DAPI, TRITC)
    for p in (CMU, TCGA, DAPI, TRITC):
        row = probe_slide(str(p))
        with openslide.OpenSlide(str(p)) as s:
            assert row["status"] == "ok", row["error"]
            assert (row["width"], row["height"]) == s.dimensions
            assert row["level_count"] == s.level_count
            assert [(lv["width"], lv["height"]) for lv in row["levels"]] == list(s.level_dimensions)
            assert [lv["downsample"] for lv in row["levels"]] == list(s.level_downsamples)
            assert row["vendor"] == s.properties["openslide.vendor"]
            mpp = s.properties.get("openslide.mpp-x")
            assert row["mpp_x"] == (float(mpp) if mpp else None)
        assert row["file_size"] == p.stat().st_size
        assert row["slide_id"] == fingerprint_file(str(p))[:16]
    assert probe_slide(str(CMU))["mpp_source"] == "openslide.mpp-x"
    assert probe_slide(str(CMU))["objective_power"] == 20.0
    # the manifest's sha256 is the content fingerprint
    assert probe_slide(str(CMU))["fingerprint"] == "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
    tcga = probe_slide(str(TCGA))
    assert tcga["mpp_x"] is None and tcga["mpp_source"] is None


def test_no_identifying_properties_copied():
    need(CMU)
    row = probe_slide(str(CMU))
    assert "aperio.Filename" not in row["properties"] and "openslide.comment" not in row["properties"]
    assert "aperio.User" not in row["properties"]
    assert row["properties"]["openslide.vendor"] == "aperio"


def test_list_inputs_folders_globs_manifest(tmp_path):
    (tmp_path / "a").mkdir()
    make_tiff(tmp_path / "a" / "one.tiff", 64, 64)
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "sub").mkdir()
    make_tiff(tmp_path / "a" / "sub" / "two.TIF", 64, 64)
    os.symlink(tmp_path / "a", tmp_path / "a" / "sub" / "loop")  # a symlink loop is not followed
    got = list_inputs([str(tmp_path / "a")], ["tif", "tiff"])
    assert sorted(os.path.basename(p) for p in got["path"]) == ["one.tiff", "two.TIF"]
    got = list_inputs([str(tmp_path / "a" / "*.tiff"), str(tmp_path / "a" / "one.tiff")], ["tiff"])
    assert len(got) == 1  # duplicates removed
    man = tmp_path / "m.csv"
    man.write_text("path,label,patient\na/one.tiff,tumour,P1\n")
    got = list_inputs([str(man)], ["tiff"])
    assert got["path"][0] == str(tmp_path / "a" / "one.tiff")
    assert got["attributes"][0] == {"label": "tumour", "patient": "P1"}
    with pytest.raises(FileNotFoundError):
        list_inputs([str(tmp_path / "missing.svs")], ["svs"])


@pytest.mark.spark
@pytest.mark.parametrize("on_driver_below", [0, 100], ids=["executors", "driver"])
def test_discover_job_with_broken_files_and_duplicates(spark, tmp_path, lake, on_driver_below):
    need(CMU, DAPI)
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(CMU, d / "cmu.svs")
    shutil.copy(CMU, d / "cmu-copy.svs")  # same content, other path
    shutil.copy(DAPI, d / "dapi.ndpi")
    (d / "empty.svs").write_bytes(b"")
    (d / "garbage.ndpi").write_bytes(os.urandom(5000))
    data = CMU.read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 2])
    cfg = PipelineConfig(inputs=[str(d)], lake=str(lake), discovery={"on_driver_below": on_driver_below})
    rec = run_discover(spark, cfg)
    assert rec.status == "succeeded"
    assert (rec.counts["slides_discovered"], rec.counts["slides_ok"], rec.counts["slides_error"]) == (6, 3, 3)
    slides = pl.read_delta(str(lake / "slides"))
    assert slides.height == 6
    by = {os.path.basename(p): r for p, r in zip(slides["path"], slides.iter_rows(named=True))}
    assert by["empty.svs"]["status"] == "error" and "empty" in by["empty.svs"]["error"]
    assert by["garbage.ndpi"]["status"] == "error" and by["garbage.ndpi"]["error"]
    assert by["truncated.svs"]["status"] == "error"
    assert by["cmu.svs"]["slide_id"] == by["cmu-copy.svs"]["slide_id"]
    assert by["dapi.ndpi"]["mpp_x"] == pytest.approx(0.2281750559028887)
    # rescanning the same files replaces their rows: still 6
    run_discover(spark, cfg)
    again = pl.read_delta(str(lake / "slides"))
    assert again.height == 6 and again["path"].n_unique() == 6
    runs = pl.read_delta(str(lake / "runs"))
    assert runs.height == 2 and set(runs["status"]) == {"succeeded"}
    errs = runs["slide_errors"][0]
    assert {os.path.basename(e["path"]) for e in errs} == {"empty.svs", "garbage.ndpi", "truncated.svs"}


@pytest.mark.spark
def test_assumed_mpp_fills_missing_mpp(spark, lake):
    need(TCGA)
    cfg = PipelineConfig(inputs=[str(TCGA)], lake=str(lake), resolution={"mpp": 0.5, "assumed_mpp": 0.25})
    run_discover(spark, cfg)
    row = pl.read_delta(str(lake / "slides")).row(0, named=True)
    assert row["status"] == "ok" and row["mpp_x"] == 0.25 and row["mpp_source"] == "assumed"


@pytest.mark.spark
def test_driver_and_executor_probes_give_the_same_rows(spark, tmp_path):
    need(CMU)
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(CMU, d / "cmu.svs")
    (d / "garbage.svs").write_bytes(os.urandom(3000))
    make_tiff(d / "plain.tiff", 300, 200, levels=2, tile=64)
    listed = list_inputs([str(d)], ["svs", "tiff"])
    on_exec = discover(spark, listed, "r", on_driver_below=0)
    on_driver = discover(spark, listed, "r", on_driver_below=10)

    def key(rows):
        return sorted(({k: v for k, v in r.items() if k != "discovered_at"} for r in rows), key=lambda r: r["path"])

    assert len(on_exec) == 3 and key(on_exec) == key(on_driver)
    assert [r["status"] for r in key(on_exec)] == ["ok", "error", "ok"]


@pytest.mark.spark
def test_property_allowlist_is_configurable_and_identifiers_stay_out(spark, tmp_path, lake):
    need(CMU)
    with openslide.OpenSlide(str(CMU)) as s:
        assert "aperio.Filename" in s.properties  # the file carries an identifier-like field
    cfg = PipelineConfig(inputs=[str(CMU)], lake=str(lake), discovery={"properties": ["openslide.vendor", "aperio.MPP"]})
    run_discover(spark, cfg)
    row = pl.read_delta(str(lake / "slides")).row(0, named=True)
    assert dict(row["properties"]) == {"openslide.vendor": "aperio", "aperio.MPP": "0.4990"}
    # by default no free-text property is stored anywhere in the slides table
    lake2 = tmp_path / "lake2"
    run_discover(spark, PipelineConfig(inputs=[str(CMU)], lake=str(lake2)))
    props = dict(pl.read_delta(str(lake2 / "slides")).row(0, named=True)["properties"])
    assert not {"aperio.Filename", "aperio.User", "openslide.comment", "aperio.Date"} & set(props)
    assert props["openslide.vendor"] == "aperio"


def test_unreadable_file_is_an_error_row(tmp_path):
    """A slide file the job may not read gives an error row with the OS's reason, not a crash.
    Root ignores file modes, so as root (CI) the probe runs in a child without the capabilities
    that bypass them (``setpriv``, util-linux)."""
    import json
    import subprocess
    import sys

    p = tmp_path / "locked.svs"
    need(CMU)
    shutil.copy(CMU, p)
    p.chmod(0)
    if os.geteuid() == 0:
        code = ("import json, sys; from slidelake.slides import probe_slide; "
                "r = probe_slide(sys.argv[1]); print(json.dumps([r['status'], r['error']]))")
        drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
        out = subprocess.run(drop + [sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                             check=True).stdout
        status, error = json.loads(out)
    else:
        row = probe_slide(str(p))
        status, error = row["status"], row["error"]
    assert status == "error" and "Permission denied" in error
