import pytest
from pydantic import ValidationError

from slidelake.config import PipelineConfig, ResolutionConfig, config_hash, load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for f in sorted((ROOT / "conf").glob("*.yaml")):
        cfg = load_config(f)
        assert isinstance(cfg, PipelineConfig), f


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("grid:\n  tile_extnt: 256\n")
    with pytest.raises(ValidationError, match="tile_extnt"):
        load_config(p)


def test_resolution_needs_exactly_one_unit():
    with pytest.raises(ValidationError, match="exactly one"):
        ResolutionConfig(mpp=0.5, level=1)
    with pytest.raises(ValidationError, match="exactly one"):
        ResolutionConfig()
    with pytest.raises(ValidationError, match="resample"):
        ResolutionConfig(level=0, fallback="resample")


def test_override_replaces_resolution_unit(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("resolution:\n  level: 1\n  fallback: floor\ngrid:\n  tile_extent: [128, 64]\n")
    cfg = load_config(p, {"resolution": {"mpp": 0.25}, "grid": {"stride": 32}})
    assert cfg.resolution.unit == "mpp" and cfg.resolution.level is None
    assert cfg.resolution.fallback == "floor"
    assert cfg.grid.tile_extent == (128, 64) and cfg.grid.stride_xy == (32, 32)


def test_config_hash_tracks_tiling_settings_only():
    a = PipelineConfig(lake="a", inputs=["x"])
    b = PipelineConfig(lake="b", inputs=["y"])
    c = PipelineConfig(grid={"tile_extent": 512})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)


def test_mask_and_annotation_settings_are_validated_and_hashed():
    with pytest.raises(ValidationError, match="tile_roi"):
        PipelineConfig(grid={"tile_roi": "POLYGON ((0 0, 1 1"})
    with pytest.raises(ValidationError, match="positive area"):
        PipelineConfig(grid={"tile_roi": "LINESTRING (0 0, 10 10)"})
    with pytest.raises(ValidationError, match="threshold"):
        PipelineConfig(masks={"threshold": "mean"})
    base = PipelineConfig()
    assert base.masks.enabled and base.filter.min_tissue_fraction == 0.5
    assert config_hash(PipelineConfig(masks={"mpp": 4.0})) != config_hash(base)
    assert config_hash(PipelineConfig(masks={"chunk_px": 1024})) == config_hash(base)  # memory only
    assert config_hash(PipelineConfig(filter={"min_tissue_fraction": 0.2})) != config_hash(base)


def test_flag_overrides_merge_into_the_defaults(tmp_path):
    """A flag that sets one key of a section keeps the section's other keys: ``--assumed-mpp``
    alone (no config file) keeps the default mpp request, ``--fallback`` keeps the file's unit."""
    cfg = load_config(None, {"resolution": {"assumed_mpp": 0.5}})
    assert (cfg.resolution.unit, cfg.resolution.value, cfg.resolution.assumed_mpp) == ("mpp", 0.5, 0.5)
    f = tmp_path / "c.yaml"
    f.write_text("resolution: {downsample: 4}\ngrid: {tile_extent: 128}\n")
    cfg = load_config(f, {"resolution": {"fallback": "floor"}, "grid": {"last": "keep"}})
    assert (cfg.resolution.unit, cfg.resolution.value, cfg.resolution.fallback) == ("downsample", 4.0, "floor")
    assert cfg.grid.tile_extent == (128, 128) and cfg.grid.last == "keep"
    assert load_config(f, {"resolution": {"level": 1}}).resolution.unit == "level"  # a unit replaces the unit
