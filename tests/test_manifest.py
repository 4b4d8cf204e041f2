"""Manifest columns that become typed columns (slide label, patient, split) and patient-level
splits, end to end on generated slides."""

import hashlib

import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import as_older_lake, make_tiff
from slidelake.config import PipelineConfig
from slidelake.pipeline import run_all
from slidelake.manifest import ManifestError, assign_split

RAW_ALL = {"decode": {"encoding": "raw"}, "filter": {"max_background_fraction": None}, "masks": {"enabled": False},
           "resolution": {"level": 0}, "grid": {"tile_extent": 128}}


def test_assign_split_follows_its_formula_and_shares():
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    for patient in ("P1", "TCGA-CR-7395", "x"):
        u = int(hashlib.sha256(f"3:{patient}".encode()).hexdigest()[:16], 16) / 2**64
        want = "train" if u < 0.7 else "val" if u < 0.85 else "test"
        assert assign_split(patient, fr, 3) == want
    got = [assign_split(f"patient-{k}", fr, 0) for k in range(20_000)]
    for name, share in fr.items():
        assert got.count(name) / len(got) == pytest.approx(share, abs=0.015)
    assert [assign_split(f"patient-{k}", fr, 1) for k in range(50)] != got[:50]  # the seed matters


def _slides(tmp_path, n):
    paths = []
    for k in range(n):
        p = tmp_path / "slides" / f"s{k}.tiff"
        p.parent.mkdir(exist_ok=True)
        make_tiff(p, 256, 128, tile=64, seed=k)
        paths.append(p)
    return paths


def _cfg(lake, manifest, **kw):
    return PipelineConfig.model_validate({"inputs": [str(manifest)], "lake": str(lake), **RAW_ALL, **kw})


@pytest.mark.spark
def test_labels_patients_and_patient_level_splits_reach_slides_and_tiles(spark, tmp_path, lake):
    """Six slides of three patients: ``label``, ``patient_id`` and ``split`` become typed
    columns of ``slides`` and ``tiles`` (other manifest columns stay in ``attributes``); a
    patient's manifest split is taken for all their slides; the others get the seeded
    per-patient split, so no patient is in two splits."""
    paths = _slides(tmp_path, 6)
    manifest = tmp_path / "manifest.csv"
    rows = ["path,label,patient_id,split,stain"]
    for k, p in enumerate(paths):
        split = "test" if k == 0 else ""  # patient A's first slide fixes A's split
        rows.append(f"{p},{'tumor' if k % 2 else 'normal'},{'ABC'[k // 2]},{split},HE")
    manifest.write_text("\n".join(rows) + "\n")
    rec = run_all(spark, _cfg(lake, manifest, splits={"fractions": {"train": 0.5, "test": 0.5}, "seed": 1}))
    slides = pl.read_delta(str(lake / "slides")).sort("path")
    assert slides["slide_label"].to_list() == ["normal", "tumor"] * 3
    assert slides["patient_id"].to_list() == ["A", "A", "B", "B", "C", "C"]
    want = {"A": "test", "B": assign_split("B", {"train": 0.5, "test": 0.5}, 1),
            "C": assign_split("C", {"train": 0.5, "test": 0.5}, 1)}
    assert slides["split"].to_list() == [want[p] for p in slides["patient_id"]]
    attributes = DeltaTable(str(lake / "slides")).to_pyarrow_table(columns=["attributes"]).column(0).to_pylist()
    assert attributes == [[("stain", "HE")]] * 6  # the other manifest columns only
    tiles = pl.read_delta(str(lake / "tiles"))
    assert tiles.height == rec.counts["tiles_written"] == 6 * 2
    per_patient = tiles.group_by("patient_id").agg(pl.col("split").n_unique().alias("splits"))
    assert per_patient["splits"].to_list() == [1, 1, 1]
    joined = tiles.select("slide_id", "slide_label", "patient_id", "split").unique().join(
        slides.select("slide_id", "slide_label", "patient_id", "split"), on="slide_id")
    assert joined.height == 6 and (joined["split"] == joined["split_right"]).all()
    assert (joined["slide_label"] == joined["slide_label_right"]).all()


@pytest.mark.spark
def test_a_patient_in_two_manifest_splits_stops_the_run_before_any_read(spark, tmp_path, lake):
    paths = _slides(tmp_path, 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,patient_id,split\n{paths[0]},P7,train\n{paths[1]},P7,test\n")
    with pytest.raises(ManifestError, match=r"^patient P7 is in splits 'train' and 'test' in the manifest"):
        run_all(spark, _cfg(lake, manifest))
    assert not (lake / "slides").exists()
    runs = pl.read_delta(str(lake / "runs"))
    assert runs["status"].to_list() == ["failed"] and "ManifestError" in runs["error"][0]


@pytest.mark.spark
def test_an_older_lake_gains_the_columns(spark, tmp_path, lake):
    """A lake whose slides and tiles tables predate the typed manifest columns: a forced run
    adds them (Delta schema evolution) and every reader sees them."""
    paths = _slides(tmp_path, 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label,patient_id\n{paths[0]},tumor,P1\n")
    cfg = _cfg(lake, manifest)
    run_all(spark, cfg)
    as_older_lake(lake)
    run_all(spark, cfg, force=True)
    for table in ("slides", "tiles"):
        df = pl.read_delta(str(lake / table))
        assert df["slide_label"].unique().to_list() == ["tumor"] and df["patient_id"].unique().to_list() == ["P1"]
