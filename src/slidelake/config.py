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

# Slide properties copied into ``slides.properties``: scanner facts only. Free-text fields such
# as ``openslide.comment`` or ``aperio.Filename`` can hold patient identifiers and are left out.
PROPERTY_ALLOWLIST: tuple[str, ...] = (
    "openslide.vendor", "openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power",
    "openslide.quickhash-1", "openslide.background-color", "openslide.bounds-x",
    "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height",
    "openslide.level[0].tile-width", "openslide.level[0].tile-height",
    "aperio.AppMag", "aperio.MPP", "hamamatsu.SourceLens", "mirax.GENERAL.OBJECTIVE_MAGNIFICATION",
    "tiff.ResolutionUnit", "tiff.XResolution", "tiff.YResolution",
)

SLIDE_EXTENSIONS: tuple[str, ...] = (
    "svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "bif", "svslide",
    "ome.tif", "ome.tiff", "dcm",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiscoveryConfig(_Strict):
    """Which files are slides. ``extensions`` are matched case-insensitively, without dot.

    ``exclude``: file-name glob patterns (``fnmatch``, case-insensitive) skipped when walking
    folders and globs; by default the ``<slide>.mask.tif[f]`` overlay sidecars of
    :class:`MaskConfig`.
    ``properties``: slide properties copied into ``slides.properties``, an allowlist (default
    :data:`PROPERTY_ALLOWLIST`: scanner facts only). Free text such as ``aperio.Filename``,
    ``openslide.comment`` or DICOM patient tags can identify a patient and is never copied unless
    listed here; label and macro images are never read.
    ``on_driver_below``: fewer files than this are probed (SHA-256 and header) on the driver,
    one thread per core, instead of in a Spark job whose start-up costs more (the rule Spark
    itself uses to list a few paths on the driver); 0 always probes on the executors.
    ``label_column`` / ``patient_column`` / ``split_column``: the manifest columns that become
    the typed ``slide_label``, ``patient_id`` and ``split`` columns of ``slides`` and ``tiles``
    (every other manifest column goes to ``attributes``).
    """

    extensions: list[str] = Field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    recursive: bool = True
    exclude: list[str] = Field(default_factory=lambda: ["*.mask.tif", "*.mask.tiff"])
    on_driver_below: int = Field(default=8, ge=0)
    properties: list[str] = Field(default_factory=lambda: list(PROPERTY_ALLOWLIST))
    label_column: str = "label"
    patient_column: str = "patient_id"
    split_column: str = "split"


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
    in level-0 px. ``tile_roi`` is a region inside every tile (WKT polygon in tile px, origin
    at the tile's top-left, e.g. ``"POLYGON ((64 64, 192 64, 192 192, 64 192, 64 64))"``) to
    which tissue, overlay and annotation fractions are restricted; ``null`` = the whole tile.
    """

    tile_extent: tuple[int, int] = (256, 256)
    stride: tuple[int, int] | None = None
    last: Literal["keep", "drop", "shift"] = "drop"
    roi: tuple[int, int, int, int] | None = None
    tile_roi: str | None = None

    _coerce_extent = field_validator("tile_extent", "stride", mode="before")(_pair)

    @model_validator(mode="after")
    def _check(self) -> "GridConfig":
        if min(self.tile_extent) < 1:
            raise ValueError("grid.tile_extent must be >= 1 px")
        if self.stride is not None and min(self.stride) < 1:
            raise ValueError("grid.stride must be >= 1 px")
        if self.roi is not None and (self.roi[2] < 1 or self.roi[3] < 1 or min(self.roi[:2]) < 0):
            raise ValueError("grid.roi must be [x >= 0, y >= 0, width >= 1, height >= 1] in level-0 px")
        if self.tile_roi is not None:
            import shapely

            try:
                geom = shapely.from_wkt(self.tile_roi)
            except Exception as exc:  # noqa: BLE001 - shapely raises its own GEOSException
                raise ValueError(f"grid.tile_roi is not valid WKT: {exc}") from None
            if geom.is_empty or geom.area <= 0:
                raise ValueError("grid.tile_roi must be a polygon with positive area (tile px)")
        return self

    @property
    def stride_xy(self) -> tuple[int, int]:
        """Stride in tile px, defaulting to the extent."""
        return self.stride if self.stride is not None else self.tile_extent


class DecodeConfig(_Strict):
    """Pixel decode and encoding of the stored tile bytes.

    ``encoding``: ``raw`` (uint8 RGB, row-major, shape (h, w, 3)), ``png``, ``jpeg`` (``quality``)
    or ``webp`` (``quality``; 100 = lossless). The default ``jpeg`` q90 is justified by the
    measurement in ``docs/encoding.md``. ``batch_size`` and ``batch_mb`` (MiB of uncompressed
    RGB tiles, whichever is smaller) bound the tiles decoded per Arrow
    batch, hence the memory of a Python worker. A pixel is *background* when all of R, G, B are
    >= ``background_threshold`` (near-white, brightfield convention; padding counts too).
    ``reader``: ``auto`` decodes the file's own JPEG tiles where a level qualifies (Aperio SVS,
    generic tiled TIFF; :mod:`slidelake.native`) and uses OpenSlide elsewhere; ``openslide``
    always uses ``read_region``. ``native_cache_tiles``: decoded stored tiles kept per open
    level (memory: tiles x tile area x 3 bytes).
    """

    encoding: Literal["raw", "png", "jpeg", "webp"] = "jpeg"
    quality: int = Field(default=90, ge=1, le=100)
    batch_size: int = Field(default=256, ge=1)
    batch_mb: float = Field(default=8.0, gt=0)
    background_threshold: int = Field(default=220, ge=0, le=255)
    max_open_slides: int = Field(default=8, ge=1)
    reader: Literal["auto", "openslide"] = "auto"
    native_cache_tiles: int = Field(default=32, ge=1)


class FilterConfig(_Strict):
    """Which tiles are kept; a tile is kept when every given bound holds (``null`` disables one).

    Applied **before pixel decode**, from the overlap stage (metadata only):

    * ``min_tissue_fraction``: minimum fraction (0-1) of the tile's in-slide area (or of its
      ``grid.tile_roi``) covered by tissue in the slide's mask; used only when masks are
      enabled;
    * ``min_annotated_fraction``: minimum fraction covered by any annotation polygon
      (restricts tiles to annotated regions; slides without annotations then keep no tiles).

    Applied **after decode**, on the pixels:

    * ``min_std``: minimum standard deviation of the tile's grey levels (0-255 scale);
    * ``max_background_fraction``: maximum fraction (0-1) of background pixels.
    """

    min_std: float | None = Field(default=None, ge=0)
    max_background_fraction: float | None = Field(default=0.9, ge=0, le=1)
    min_tissue_fraction: float | None = Field(default=0.5, ge=0, le=1)
    min_annotated_fraction: float | None = Field(default=None, ge=0, le=1)


class MaskConfig(_Strict):
    """Tissue masks, one per slide, kept as reusable overlays (see :mod:`slidelake.masks`).

    The mask is computed at ``mpp`` µm/px from the pyramid level nearest that resolution (the
    finest level not finer than needed, read in ``chunk_px`` x ``chunk_px`` regions so memory
    stays bounded) and saved as a pyramidal TIFF overlay (0 background, 255 tissue).

    * ``method``: ``saturation`` (HSV saturation, the CLAM convention for H&E) or
      ``grayscale`` (darkness, 255 - grey). Fluorescence slides always use the log of the
      brightest channel (their background is black, so saturation is meaningless).
    * ``polarity``: ``brightfield`` (dark tissue on white), ``fluorescence`` (bright tissue on
      black) or ``auto`` (fluorescence when the median grey of the slide's border is below 80).
    * ``threshold``: ``otsu``, ``multi_otsu`` (3 classes, tissue above the lowest threshold,
      as ratiopath's ``tissue_mask``) or a fixed number on the method's scale (saturation
      0-1, darkness 0-255, log intensity 0-5.55).
    * ``smooth_um``: Gaussian sigma (µm) applied before thresholding; 0 disables.
    * ``close_um`` / ``open_um``: radius (µm) of the disks of the morphological closing, then
      opening; 0 disables.
    * ``min_object_um2`` / ``min_hole_um2``: tissue objects and holes of at most this area
      (µm²) are removed / filled.
    * ``overlay_column`` / ``overlay_suffix``: a user overlay (e.g. a segmentation model's TIFF)
      given by this manifest column, or found next to the slide as ``<stem><suffix>`` (also
      ``.tif``), is used instead of computing a mask.
    * ``max_megapixels``: a mask larger than this (a corrupt header claiming absurd dimensions,
      or ``mpp`` far too fine) is refused with an error row instead of exhausting memory; a
      200,000 x 100,000 px slide at 0.25 µm/px gives 20 Mpx at 8 µm/px. The masks stage's
      working memory is about 16 bytes per mask pixel, inputs included (~120 MiB for the 7.8 Mpx
      mask of a 100,000 x 80,000 px slide, measured in ``docs/benchmarks.md``).
    * ``on_driver_below``: fewer slides than this get their masks made on the driver, one
      thread per core, instead of in a Spark job (whose start-up costs more than a mask);
      ``0`` always uses Spark.
    * ``reader``: ``auto`` reads the mask's level from the file's own JPEG tiles where the
      level qualifies (as ``decode.reader``; :mod:`slidelake.native`, the same pixels as
      ``read_region`` on the Aperio samples and the benchmark slide, in half the time), else
      with OpenSlide; ``openslide`` always uses ``read_region``. Not part of ``params_hash``.
    * ``overlay_root``: folder for the overlay files (``null``: ``<lake>/overlays``). Overlays are
      written with ordinary file I/O by the executors: with a lake on object storage
      (``s3://``), point this at a shared mounted folder (EFS, FSx, a Databricks Volume).
    """

    enabled: bool = True
    mpp: float = Field(default=8.0, gt=0)
    method: Literal["saturation", "grayscale"] = "saturation"
    polarity: Literal["auto", "brightfield", "fluorescence"] = "auto"
    threshold: Literal["otsu", "multi_otsu"] | float = "otsu"
    smooth_um: float = Field(default=16.0, ge=0)
    close_um: float = Field(default=16.0, ge=0)
    open_um: float = Field(default=8.0, ge=0)
    min_object_um2: float = Field(default=20000.0, ge=0)
    min_hole_um2: float = Field(default=20000.0, ge=0)
    chunk_px: int = Field(default=2048, ge=256)
    max_megapixels: float = Field(default=64.0, gt=0)
    on_driver_below: int = Field(default=2, ge=0)
    reader: Literal["auto", "openslide"] = "auto"
    overlay_column: str = "overlay_path"
    overlay_suffix: str = ".mask.tiff"
    overlay_root: str | None = None

    def algorithm_dict(self) -> dict[str, Any]:
        """The settings that determine a computed mask's pixels (hashed into ``params_hash``)."""
        return self.model_dump(mode="json", include={
            "mpp", "method", "polarity", "threshold", "smooth_um", "close_um", "open_um",
            "min_object_um2", "min_hole_um2",
        })


class AnnotationConfig(_Strict):
    """Polygon annotations (GeoJSON, QuPath export layout, coordinates in level-0 px).

    Found by the manifest column ``column`` or as a sidecar ``<slide stem><sidecar_suffix>``
    next to the slide. Each tile gets ``class_fractions`` (class name -> fraction of the
    tile's area) and ``label``: the class with the largest fraction when that fraction is at
    least ``label_min_fraction``, else null.
    """

    enabled: bool = True
    column: str = "annotations_path"
    sidecar_suffix: str = ".geojson"
    label_min_fraction: float = Field(default=0.5, ge=0, le=1)


class SplitConfig(_Strict):
    """Patient-level splits for slides whose manifest gives no ``split``.

    ``fractions``: split name -> share of patients, e.g. ``{train: 0.7, val: 0.15, test: 0.15}``
    (summing to 1); ``null`` assigns none. A patient (``patient_id``, else the slide's
    ``slide_id``) goes to the split whose cumulative share first exceeds
    ``u = SHA-256("<seed>:<patient>")`` read as a fraction of 2**64: deterministic, every slide
    of a patient in one split, and stable as slides are added (a patient never moves). Each
    slide label's patients are split in these shares in expectation (the hash ignores the
    label), not exactly; the exact counts are one query away (``docs/tables.md``).
    """

    fractions: dict[str, float] | None = None
    seed: int = 0

    @field_validator("fractions")
    @classmethod
    def _shares(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            if not v or any(f <= 0 for f in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
                raise ValueError(f"splits.fractions: positive shares summing to 1, got {v}")
        return v


class PartitionConfig(_Strict):
    """How tile rows are spread over Spark tasks.

    Tiles are grouped in regions of ``region_tiles`` x ``region_tiles`` neighbouring tiles, a
    region in one task (nearby tiles read with one slide handle), and the regions dealt out to
    the tasks on a diagonal lattice so each task gets an even share of the tissue
    (:func:`slidelake.decode.region_task`).
    The number of partitions is ``ceil(tiles / tiles_per_partition)`` where ``tiles`` is the
    number expected to be decoded (with masks: grid size x the mask's tissue fraction), rounded
    up to a multiple of Spark's default parallelism so the last wave of tasks fills every core.
    """

    region_tiles: int = Field(default=8, ge=1)
    tiles_per_partition: int = Field(default=2048, ge=1)


class TablesConfig(_Strict):
    """Where and how the Delta tables are written.

    ``writer``: ``auto`` (Spark's Delta writer when the Delta jars are on the classpath,
    otherwise Spark-written Parquet committed with delta-rs), ``spark`` or ``delta-rs``.
    ``catalog_database``: also register the tables by name in this database (e.g. on
    Databricks); ``null`` keeps them path-only. ``tiles_table`` names the tile table folder
    under the lake root, so several tiling configs can live side by side.
    ``tile_compression``: Parquet compression of the ``tile`` column when the workers write the
    tile files (``delta-rs`` writer; the other columns always use zstd). ``none`` by default:
    ``jpeg``/``png``/``webp`` tiles are already compressed, and raw pixels of tissue gained
    ~8 % from zstd level 1 for ~0.4 ms per 256 px tile (``docs/benchmarks.md``).
    ``direct_io``: the workers write the tile files around the page cache (``O_DIRECT``, where
    the filesystem allows it; the same bytes; :mod:`slidelake.direct_io`). ``false`` writes
    through the page cache.
    ``slides_per_commit``: slides tiled per tiles-table commit; a run killed half way keeps the
    batches already committed, and running it again does the rest.
    ``path_root``: slide paths under this folder are stored relative to it in every table
    (``slides``, ``masks``, ``tiles``, ``tile_errors``, ``run_slides``, ``runs``), so the lake
    does not record where (or under whose name) the archive is mounted; paths outside it stay
    absolute. Jobs given the same ``path_root`` resolve them again.
    """

    writer: Literal["auto", "spark", "delta-rs"] = "auto"
    catalog_database: str | None = None
    tiles_table: str = Field(default="tiles", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tile_compression: Literal["none", "zstd", "lz4", "snappy"] = "none"
    direct_io: bool = True
    slides_per_commit: int = Field(default=16, ge=1)
    path_root: str | None = None


class StorageConfig(_Strict):
    """How object storage (``s3://`` lake roots and overlay files) is reached.

    Credentials never come from here: they come from the standard AWS chain of each process
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, a profile, an
    instance role), so they never reach a table, a log or ``runs.config``.
    ``endpoint``: URL of an S3-compatible server (e.g. ``http://127.0.0.1:8333``); ``null``
    takes ``AWS_ENDPOINT_URL``, else AWS. ``region``: ``null`` takes ``AWS_REGION``.
    ``path_style``: address buckets as ``endpoint/bucket/key`` (most S3-compatible servers)
    instead of ``bucket.endpoint/key``; ``null``: path style exactly when an endpoint is set.
    ``cache_dir`` / ``cache_gb``: slides on object storage are copied into this folder of each
    machine that reads them (``null``: ``~/.cache/slidelake/slides``), at most ``cache_gb`` GB,
    least recently used first out (:mod:`slidelake.slide_cache`).
    """

    endpoint: str | None = None
    region: str | None = None
    path_style: bool | None = None
    cache_dir: str | None = None
    cache_gb: float = Field(default=50.0, gt=0)


class PipelineConfig(_Strict):
    """The whole configuration of a slidelake run.

    ``inputs``: files, folders (searched recursively), glob patterns, or manifests (``.csv`` or
    ``.parquet`` with a ``path`` column; other columns are carried along as slide columns).
    ``lake``: the lake root holding the tables ``slides/``, ``masks/``, ``tiles/``, ``runs/``
    and the mask overlay files under ``overlays/``.
    """

    inputs: list[str] = Field(default_factory=list)
    lake: str = "lake"
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    resolution: ResolutionConfig = Field(default_factory=lambda: ResolutionConfig(mpp=0.5))
    grid: GridConfig = Field(default_factory=GridConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    masks: MaskConfig = Field(default_factory=MaskConfig)
    annotations: AnnotationConfig = Field(default_factory=AnnotationConfig)
    splits: SplitConfig = Field(default_factory=SplitConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    tables: TablesConfig = Field(default_factory=TablesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    def tiling_dict(self) -> dict[str, Any]:
        """The settings that determine tile content (hashed by :func:`config_hash`)."""
        return {
            "resolution": self.resolution.model_dump(mode="json"),
            "grid": self.grid.model_dump(mode="json"),
            "decode": self.decode.model_dump(
                mode="json", include={"encoding", "quality", "background_threshold", "reader"}
            ),
            "filter": self.filter.model_dump(mode="json"),
            "masks": self.masks.model_dump(mode="json", exclude={"chunk_px", "overlay_root", "max_megapixels",
                                                                  "on_driver_below"})
            if self.masks.enabled
            else {"enabled": False},
            "annotations": self.annotations.model_dump(mode="json"),
            **({"splits": self.splits.model_dump(mode="json")} if self.splits.fractions else {}),
        }


def config_hash(cfg: PipelineConfig) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of :meth:`PipelineConfig.tiling_dict`."""
    blob = json.dumps(cfg.tiling_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


RESOLUTION_UNITS = {"level", "mpp", "downsample", "magnification"}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config and apply nested ``overrides`` (e.g. from CLI flags), each layer
    merged key by key into the one below: the model's defaults, the file, the overrides. A
    layer that names a resolution unit (``level``, ``mpp``, ``downsample``, ``magnification``)
    replaces the unit below it: ``{"resolution": {"level": 0}}`` over the default ``mpp: 0.5``
    asks for level 0 only; ``{"resolution": {"assumed_mpp": 0.5}}`` keeps the unit below.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file does not hold a mapping.
        pydantic.ValidationError: unknown keys, wrong types or inconsistent values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must hold a mapping at top level")
    merged = PipelineConfig().model_dump(mode="json")
    for layer in (data, overrides or {}):
        res = layer.get("resolution")
        if isinstance(res, dict) and RESOLUTION_UNITS & set(res):
            merged["resolution"] = {k: v for k, v in merged["resolution"].items() if k not in RESOLUTION_UNITS}
        merged = _deep_merge(merged, layer)
    return PipelineConfig.model_validate(merged)
