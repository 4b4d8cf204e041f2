"""Typed pipeline configuration, loaded from YAML (``conf/*.yaml``) and CLI overrides.

Every setting lives in one :class:`PipelineConfig`. Unknown keys are errors (pydantic
``extra="forbid"``), so a typo in a YAML file fails loudly instead of being ignored.

Units, used consistently across slidelake:

* *level-0 px*: pixels of the slide's full-resolution level (OpenSlide level 0);
* *tile px*: pixels at the tile resolution chosen by :mod:`slidelake.resolution`;
* *mpp*: micrometres per pixel (µm/px).

:func:`config_hash` fingerprints the settings that change tile content (resolution, grid,
decode, filter); paths, the lake root and Spark settings do not change it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SLIDE_EXTENSIONS: tuple[str, ...] = (
    "svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "bif", "svslide",
    "ome.tif", "ome.tiff", "dcm",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiscoveryConfig(_Strict):
    """Which files are slides. ``extensions`` are matched case-insensitively, without dot."""

    extensions: list[str] = Field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    recursive: bool = True


class ResolutionConfig(_Strict):
    """The tile resolution: exactly one of ``level``, ``mpp``, ``downsample``, ``magnification``.

    * ``level``: a pyramid level index (0 = full resolution);
    * ``mpp``: µm/px wanted for the tiles;
    * ``downsample``: factor relative to level 0 (1.0 = level 0);
    * ``magnification``: objective power, converted to mpp as ``10 / magnification``
      (the usual convention: 40x ~ 0.25 µm/px, 20x ~ 0.5 µm/px).

    ``fallback`` says what happens when no pyramid level lies within ``tolerance`` (relative
    deviation of the downsample) of the request: ``error`` (per-slide error row), ``nearest``
    (closest level, by log-ratio), ``floor`` (nearest finer level), ``ceil`` (nearest coarser
    level) or ``resample`` (read the nearest finer level and resize to the exact request).
    ``assumed_mpp`` (µm/px at level 0) is used for slides whose files carry no mpp.
    """

    level: int | None = Field(default=None, ge=0)
    mpp: float | None = Field(default=None, gt=0)
    downsample: float | None = Field(default=None, ge=1.0)
    magnification: float | None = Field(default=None, gt=0)
    fallback: Literal["error", "nearest", "floor", "ceil", "resample"] = "nearest"
    tolerance: float = Field(default=0.05, ge=0)
    assumed_mpp: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "ResolutionConfig":
        given = [k for k in ("level", "mpp", "downsample", "magnification") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "resolution: give exactly one of level, mpp, downsample, magnification "
                f"(got {given or 'none'})"
            )
        if self.level is not None and self.fallback == "resample":
            raise ValueError("resolution: fallback 'resample' does not apply to a level request")
        return self

    @property
    def unit(self) -> str:
        """Which of ``level``/``mpp``/``downsample``/``magnification`` was requested."""
        for k in ("level", "mpp", "downsample", "magnification"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("unreachable: validated to have one")

    @property
    def value(self) -> float:
        """The requested value, in the unit of :attr:`unit`."""
        return float(getattr(self, self.unit))


def _pair(v: Any) -> Any:
    if isinstance(v, int):
        return [v, v]
    return v


class GridConfig(_Strict):
    """Tile grid at the tile resolution (all sizes in tile px).

    ``stride`` defaults to ``tile_extent`` (no overlap); overlap = extent - stride; a stride
    larger than the extent leaves gaps. ``last`` is the edge policy (as ratiopath's
    ``grid_tiles``): ``keep`` a partial last tile padded white, ``drop`` it, or ``shift`` it
    back inside the slide. ``roi`` restricts the grid to a rectangle ``[x, y, width, height]``
    in level-0 px.
    """

    tile_extent: tuple[int, int] = (256, 256)
    stride: tuple[int, int] | None = None
    last: Literal["keep", "drop", "shift"] = "drop"
    roi: tuple[int, int, int, int] | None = None

    _coerce_extent = field_validator("tile_extent", "stride", mode="before")(_pair)

    @model_validator(mode="after")
    def _check(self) -> "GridConfig":
        if min(self.tile_extent) < 1:
            raise ValueError("grid.tile_extent must be >= 1 px")
        if self.stride is not None and min(self.stride) < 1:
            raise ValueError("grid.stride must be >= 1 px")
        if self.roi is not None and (self.roi[2] < 1 or self.roi[3] < 1 or min(self.roi[:2]) < 0):
            raise ValueError("grid.roi must be [x >= 0, y >= 0, width >= 1, height >= 1] in level-0 px")
        return self

    @property
    def stride_xy(self) -> tuple[int, int]:
        """Stride in tile px, defaulting to the extent."""
        return self.stride if self.stride is not None else self.tile_extent


class DecodeConfig(_Strict):
    """Pixel decode and encoding of the stored tile bytes.

    ``encoding``: ``raw`` (uint8 RGB, row-major, shape (h, w, 3)), ``png``, ``jpeg`` (``quality``)
    or ``webp`` (``quality``; 100 = lossless). The default ``jpeg`` q90 is justified by the
    measurement in ``docs/encoding.md``. ``batch_size`` bounds the tiles decoded per Arrow
    batch, hence the memory of a Python worker. A pixel is *background* when all of R, G, B are
    >= ``background_threshold`` (near-white, brightfield convention; padding counts too).
    """

    encoding: Literal["raw", "png", "jpeg", "webp"] = "jpeg"
    quality: int = Field(default=90, ge=1, le=100)
    batch_size: int = Field(default=256, ge=1)
    background_threshold: int = Field(default=220, ge=0, le=255)
    max_open_slides: int = Field(default=8, ge=1)


class FilterConfig(_Strict):
    """Pixel rule applied before writing; a tile is kept when every given bound holds.

    ``min_std``: minimum standard deviation of the tile's grey levels (0-255 scale);
    ``max_background_fraction``: maximum fraction (0-1) of background pixels.
    ``null`` disables a bound.
    """

    min_std: float | None = Field(default=None, ge=0)
    max_background_fraction: float | None = Field(default=0.9, ge=0, le=1)


class PartitionConfig(_Strict):
    """How tile rows are spread over Spark tasks.

    Tiles are hashed by ``(slide_id, region)`` where a region is ``region_tiles`` x
    ``region_tiles`` neighbouring tiles, so a task reads nearby tiles with one slide handle.
    The number of partitions is ``ceil(tiles / tiles_per_partition)``, at least Spark's
    default parallelism.
    """

    region_tiles: int = Field(default=16, ge=1)
    tiles_per_partition: int = Field(default=2048, ge=1)


class TablesConfig(_Strict):
    """Where and how the Delta tables are written.

    ``writer``: ``auto`` (Spark's Delta writer when the Delta jars are on the classpath,
    otherwise Spark-written Parquet committed with delta-rs), ``spark`` or ``delta-rs``.
    ``catalog_database``: also register the tables by name in this database (e.g. on
    Databricks); ``null`` keeps them path-only. ``tiles_table`` names the tile table folder
    under the lake root, so several tiling configs can live side by side.
    """

    writer: Literal["auto", "spark", "delta-rs"] = "auto"
    catalog_database: str | None = None
    tiles_table: str = Field(default="tiles", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class PipelineConfig(_Strict):
    """The whole configuration of a slidelake run.

    ``inputs``: files, folders (searched recursively), glob patterns, or manifests (``.csv`` or
    ``.parquet`` with a ``path`` column; other columns are carried along as slide columns).
    ``lake``: the lake root holding ``slides/``, ``tiles/`` and ``runs/``.
    """

    inputs: list[str] = Field(default_factory=list)
    lake: str = "lake"
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    resolution: ResolutionConfig = Field(default_factory=lambda: ResolutionConfig(mpp=0.5))
    grid: GridConfig = Field(default_factory=GridConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    tables: TablesConfig = Field(default_factory=TablesConfig)

    def tiling_dict(self) -> dict[str, Any]:
        """The settings that determine tile content (hashed by :func:`config_hash`)."""
        return {
            "resolution": self.resolution.model_dump(mode="json"),
            "grid": self.grid.model_dump(mode="json"),
            "decode": self.decode.model_dump(
                mode="json", include={"encoding", "quality", "background_threshold"}
            ),
            "filter": self.filter.model_dump(mode="json"),
        }


def config_hash(cfg: PipelineConfig) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of :meth:`PipelineConfig.tiling_dict`."""
    blob = json.dumps(cfg.tiling_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config and apply nested ``overrides`` (e.g. from CLI flags).

    A resolution override replaces the whole request unit: overriding ``{"resolution": {"mpp":
    0.25}}`` on a file that asked for ``level`` drops the file's ``level``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        pydantic.ValidationError: unknown keys, wrong types or inconsistent values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must hold a mapping at top level")
    overrides = overrides or {}
    res_over = overrides.get("resolution") or {}
    units = {"level", "mpp", "downsample", "magnification"}
    if units & set(res_over) and isinstance(data.get("resolution"), dict):
        data["resolution"] = {k: v for k, v in data["resolution"].items() if k not in units}
    return PipelineConfig.model_validate(_deep_merge(data, overrides))
