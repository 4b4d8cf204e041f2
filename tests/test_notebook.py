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
    ns: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), ns)
    out = capsys.readouterr().out
    assert "succeeded" in out
    n = pl.read_delta(str(tmp_path / "lake" / "tiles")).height
    assert n == ns["rec"].counts["tiles_written"] > 0
    assert ns["mosaic"].shape == (256, 4 * 256, 3)
    assert ns["qc"].size[0] >= 512  # the QC picture of the sample slide was drawn and shown
