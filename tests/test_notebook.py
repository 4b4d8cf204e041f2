"""The quick-start notebook's code cells run top to bottom on the sample slide."""

import json

import polars as pl
import pytest

from conftest import CMU, ROOT, need

pytestmark = pytest.mark.spark


def test_quickstart_notebook_runs(spark, tmp_path, monkeypatch, capsys):
    need(CMU)
    monkeypatch.setenv("SLIDELAKE_ROOT", str(ROOT))
    monkeypatch.setenv("SLIDELAKE_SAMPLE", str(CMU))
    monkeypatch.setenv("SLIDELAKE_LAKE", str(tmp_path / "lake"))
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    # ready for Databricks and papermill: a %pip cell, then the parameters cell; every cell has an id
    assert "".join(code[0]["source"]).startswith("%pip install")
    assert code[1]["metadata"].get("tags") == ["parameters"] and "INPUTS = " in "".join(code[1]["source"])
    assert all(c.get("id") for c in nb["cells"]) and len({c["id"] for c in nb["cells"]}) == len(nb["cells"])
    assert not [o for c in code for o in c.get("outputs", []) if o.get("name") == "stderr"]  # no warnings kept
    ns: dict = {}
    for cell in code[1:]:  # the %pip cell installs on Databricks only
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), ns)
    out = capsys.readouterr().out
    assert "succeeded" in out
    n = pl.read_delta(str(tmp_path / "lake" / "tiles")).height
    assert n == ns["rec"].counts["tiles_written"] > 0
    assert ns["mosaic"].shape == (256, 4 * 256, 3)
    # the mosaic shows tissue, not its edges: little background in each tile
    assert all(r.background_fraction < 0.2 for r in ns["rows"])
    assert (ns["mosaic"].reshape(-1, 3).min(axis=1) > 220).mean() < 0.2
    assert ns["qc"].size[0] >= 512  # the QC picture of the sample slide was drawn and shown
