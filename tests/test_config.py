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


# Every config field with another valid value: the fields that decide tile content must change
# the config hash (a rerun with any of them changed must not skip and keep the old tiles); the
# others (memory, speed, where things are written) must not. A new field fails the test below
# until it is listed here, so none can be left out of the hash by mistake.
CHANGES_TILES = {
    "resolution": {"level": 1, "mpp": 0.25, "downsample": 2.0, "magnification": 20.0, "fallback": "floor",
                   "tolerance": 0.1, "assumed_mpp": 0.25},
    "grid": {"tile_extent": [128, 128], "stride": [200, 200], "last": "keep", "roi": [0, 0, 100, 100],
             "tile_roi": "POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0))"},
    "decode": {"encoding": "png", "quality": 80, "background_threshold": 200, "reader": "openslide"},
    "filter": {"min_std": 5.0, "max_background_fraction": 0.5, "min_tissue_fraction": 0.3,
               "min_annotated_fraction": 0.5},
    "masks": {"enabled": False, "mpp": 4.0, "method": "grayscale", "polarity": "brightfield", "threshold": 0.2,
              "smooth_um": 8.0, "close_um": 8.0, "open_um": 4.0, "min_object_um2": 1000.0, "min_hole_um2": 1000.0,
              "reader": "openslide", "overlay_column": "mask", "overlay_suffix": ".labels.tiff"},
    "annotations": {"enabled": False, "column": "geojson", "sidecar_suffix": ".json", "label_min_fraction": 0.7},
    "splits": {"fractions": {"train": 0.8, "test": 0.2}, "seed": 7},  # from a base with splits set, below
}
KEEPS_TILES = {
    # the manifest columns' values are recorded as of tiling, as ``attributes`` are
    "discovery": {"extensions": ["svs"], "recursive": False, "exclude": [], "on_driver_below": 0, "properties": [],
                  "label_column": "diagnosis", "patient_column": "case", "split_column": "fold"},
    "decode": {"batch_size": 16, "batch_mb": 1.0, "max_open_slides": 2, "native_cache_tiles": 4},
    "masks": {"chunk_px": 1024, "max_megapixels": 8.0, "on_driver_below": 0, "overlay_root": "/shared"},
    "partition": {"region_tiles": 4, "tiles_per_partition": 64},
    "tables": {"writer": "delta-rs", "catalog_database": "pathology", "tiles_table": "other",
               "tile_compression": "zstd", "direct_io": False, "slides_per_commit": 2, "path_root": "/data"},
    "storage": {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1", "path_style": False, "cache_dir": "/scratch",
                "cache_gb": 5.0},
}


# sections whose fields matter only once another is set: their changes are tried from this base
BASES = {"splits": {"splits": {"fractions": {"train": 0.5, "test": 0.5}}}}


def _every_field():
    for name, field in PipelineConfig.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        for key in sub or [None]:
            yield (name, key)


@pytest.mark.parametrize("section,key", list(_every_field()))
def test_every_config_field_is_in_the_hash_or_named_as_not_changing_tiles(section, key):
    base = load_config(None, BASES.get(section, {}))
    if key is None:  # inputs, lake
        assert section in ("inputs", "lake")
        assert config_hash(load_config(None, {section: ["x.svs"] if section == "inputs" else "/elsewhere"})) \
            == config_hash(base)
        return
    in_hash, keeps = CHANGES_TILES.get(section, {}), KEEPS_TILES.get(section, {})
    assert (key in in_hash) != (key in keeps), f"{section}.{key}: list it in CHANGES_TILES or KEEPS_TILES"
    changed = load_config(None, {**BASES.get(section, {}), section: {**BASES.get(section, {}).get(section, {}),
                                                                       key: in_hash.get(key, keeps.get(key))}})
    assert changed.model_dump()[section][key] != base.model_dump()[section][key], "the new value must differ"
    if key in in_hash:
        assert config_hash(changed) != config_hash(base), f"{section}.{key} changes tiles but not the hash"
    else:
        assert config_hash(changed) == config_hash(base), f"{section}.{key} does not change tiles"


def test_config_hash_is_stable_across_versions():
    """The hash of the default tiling config equals SHA-256 of its canonical JSON written out
    here by hand (sorted keys, no spaces): a change to the hashed settings' names, values or
    serialisation changes every lake's ``config_hash`` and makes every slide be tiled again,
    so it must be deliberate."""
    import hashlib
    import json

    tiling = {
        "annotations": {"column": "annotations_path", "enabled": True, "label_min_fraction": 0.5,
                        "sidecar_suffix": ".geojson"},
        "decode": {"background_threshold": 220, "encoding": "jpeg", "quality": 90, "reader": "auto"},
        "filter": {"max_background_fraction": 0.9, "min_annotated_fraction": None, "min_std": None,
                   "min_tissue_fraction": 0.5},
        "grid": {"last": "drop", "roi": None, "stride": None, "tile_extent": [256, 256], "tile_roi": None},
        "masks": {"close_um": 16.0, "enabled": True, "method": "saturation", "min_hole_um2": 20000.0,
                  "min_object_um2": 20000.0, "mpp": 8.0, "open_um": 8.0, "overlay_column": "overlay_path",
                  "overlay_suffix": ".mask.tiff", "polarity": "auto", "reader": "auto", "smooth_um": 16.0,
                  "threshold": "otsu"},
        "resolution": {"assumed_mpp": None, "downsample": None, "fallback": "nearest", "level": None,
                       "magnification": None, "mpp": 0.5, "tolerance": 0.05},
    }
    canonical = '{"annotations":{"column":"annotations_path","enabled":true,'
    assert json.dumps(tiling, sort_keys=True, separators=(",", ":")).startswith(canonical)
    want = hashlib.sha256(json.dumps(tiling, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert config_hash(load_config(None, {"lake": "x"})) == want
    # masks off: only that fact is hashed, whatever the mask settings
    off = {**tiling, "masks": {"enabled": False}}
    want_off = hashlib.sha256(json.dumps(off, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert config_hash(load_config(None, {"lake": "x", "masks": {"enabled": False, "mpp": 2.0}})) == want_off
