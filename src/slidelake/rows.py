"""The rows that travel between the pipeline's stages and into its tables, typed: each table's
Spark schema is made from its row type (:func:`spark_schema`), so the two cannot drift.

Each row type is a ``TypedDict`` (a plain dict at run time, so rows go to and from Spark and
Delta unchanged). A key typed ``X | None`` is a nullable column; :data:`Int32` marks a 32-bit
integer column (``int`` is 64-bit). Pixel sizes are level-0 px unless named otherwise; mpp is
µm per pixel.
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import NewType, TypedDict

Int32 = NewType("Int32", int)  # a Spark IntegerType column


def spark_schema(row_type: type, all_nullable: bool = False):
    """The Spark ``StructType`` of a row type: ``str`` -> string, ``int`` -> long,
    :data:`Int32` -> int, ``float`` -> double, ``bool`` -> boolean, ``datetime`` -> timestamp,
    ``list[X]`` -> array, ``dict[str, X]`` -> map, a nested ``TypedDict`` -> struct; a field is
    nullable when typed ``X | None`` (every field when ``all_nullable``).

    Raises:
        TypeError: a field of a type not listed above.
    """
    from pyspark.sql import types as T

    atoms = {str: T.StringType(), int: T.LongType(), Int32: T.IntegerType(), float: T.DoubleType(),
             bool: T.BooleanType(), datetime: T.TimestampType()}

    def optional(tp) -> bool:
        return typing.get_origin(tp) in (typing.Union, types.UnionType)

    def spark_type(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if optional(tp):
            return spark_type(args[0])
        if tp in atoms:
            return atoms[tp]
        if typing.get_origin(tp) is list:
            return T.ArrayType(spark_type(args[0]))
        if typing.get_origin(tp) is dict:
            return T.MapType(spark_type(args[0]), spark_type(args[1]))
        if typing.is_typeddict(tp):
            return spark_schema(tp, all_nullable)
        raise TypeError(f"{row_type.__name__}: no Spark type for {tp!r}")

    return T.StructType([
        T.StructField(name, spark_type(tp), all_nullable or optional(tp))
        for name, tp in typing.get_type_hints(row_type).items()
    ])


class LevelRow(TypedDict):
    """One pyramid level of a slide: ``width``/``height`` px at that level, ``downsample``
    level-0 px per level px (as OpenSlide reports it, e.g. 4.000135)."""

    level: Int32
    width: int
    height: int
    downsample: float


class SlideRow(TypedDict):
    """A ``slides`` row (:data:`slidelake.slides.SLIDES_SCHEMA`): one file probed by discovery.
    ``status`` is ``ok`` or ``error`` (then ``error`` says why and the sizes may be None).
    ``files``: the files whose bytes make the slide and its ``fingerprint`` (a DICOM series'
    level files, a MIRAX slide's data files), relative to ``path``'s folder.
    ``slide_label``, ``patient_id`` and ``split`` come from the manifest (``split`` also from
    ``splits``, :func:`slidelake.manifest.assign_split`); ``attributes`` holds its other columns."""

    slide_id: str | None
    path: str
    fingerprint: str | None
    files: list[str] | None
    file_size: int | None
    modified_at: datetime | None
    vendor: str | None
    width: int | None
    height: int | None
    level_count: Int32 | None
    levels: list[LevelRow] | None
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None
    objective_power: float | None
    properties: dict[str, str] | None
    attributes: dict[str, str] | None
    slide_label: str | None
    patient_id: str | None
    split: str | None
    status: str
    error: str | None
    run_id: str | None
    discovered_at: datetime | None


class Resolution(TypedDict):
    """What :func:`slidelake.resolution.resolve_row` adds to a slide row
    (:data:`slidelake.resolution.RESOLVED_FIELDS`): the ``level`` read, its
    ``level_downsample``, the tiles' ``downsample`` (level-0 px per tile px), the tiles' mpp and
    its source, the slide's extent in tile px; all None and ``resolution_error`` set when the
    request cannot be met."""

    level: Int32 | None
    level_downsample: float | None
    downsample: float | None
    tile_mpp_x: float | None
    tile_mpp_y: float | None
    tile_mpp_source: str | None
    extent_x: int | None
    extent_y: int | None
    resolution_error: str | None


class ResolvedSlide(SlideRow, Resolution):
    """A ``slides`` row with its :class:`Resolution`: the row the mask, grid and write stages
    take."""


class MaskRow(TypedDict):
    """A ``masks`` row (:data:`slidelake.masks.MASKS_SCHEMA`): one slide's tissue overlay.
    ``mask_downsample_x/y`` are level-0 px per mask px; ``tissue_fraction`` is 0-1."""

    slide_id: str
    path: str | None
    fingerprint: str | None
    source: str | None
    mask_path: str | None
    mask_mpp_x: float | None
    mask_mpp_y: float | None
    mask_downsample_x: float | None
    mask_downsample_y: float | None
    mask_width: int | None
    mask_height: int | None
    slide_width: int | None
    slide_height: int | None
    read_level: Int32 | None
    algorithm: str | None
    params: str | None
    params_hash: str
    polarity: str | None
    thresholds: list[float] | None
    tissue_fraction: float | None
    qc_path: str | None
    thumbnail_path: str | None
    status: str
    error: str | None
    run_id: str | None
    created_at: datetime | None


class TileFailure(TypedDict):
    """One failed tile as the workers report it (:data:`slidelake.write.TILE_FAILURE`): its
    grid position (tile px at the read level / stride), the ``stage`` (``overlap`` or
    ``decode``) and the error."""

    tile_x: int
    tile_y: int
    stage: str
    error: str


class SlideCount(TypedDict):
    """One slide's counts in a run (``runs.slide_counts``): the level read, the tiles' mpp, and
    its tiles generated = skipped before decode + failed in overlap + decoded, decoded =
    filtered + failed in decode + written."""

    slide_id: str
    path: str
    level: Int32
    mpp_x: float
    tiles_generated: int
    tiles_skipped: int
    tiles_decoded: int
    tiles_failed: int
    tiles_filtered: int
    tiles_written: int


class SlideError(TypedDict):
    """One slide's failure in a run (``runs.slide_errors``): the ``stage`` it failed at
    (``discover``, ``resolution``, ``masks``, ``overlap``, ``decode``) and the error."""

    slide_id: str | None
    path: str | None
    stage: str
    error: str


class TileErrorRow(TypedDict):
    """A ``tile_errors`` row: one tile that failed in a run (:class:`TileFailure` with its
    slide, the run, the config and the level read)."""

    run_id: str
    slide_id: str
    path: str
    config_hash: str
    level: Int32
    tile_x: int
    tile_y: int
    stage: str
    error: str
    created_at: datetime


class RunSlideRow(TypedDict):
    """A ``run_slides`` row: one slide whose tiles a run committed, in ``tiles_table`` at Delta
    version ``tiles_version``; the record incremental runs skip by."""

    run_id: str
    slide_id: str
    path: str
    fingerprint: str
    config_hash: str
    tiles_table: str
    tiles_version: int
    replaced_table: bool
    tiles_generated: int
    tiles_written: int
    tiles_failed: int
    created_at: datetime


class RunRow(TypedDict):
    """A ``runs`` row: what one run did (:class:`slidelake.lineage.RunRecord`). ``config`` is
    the config's JSON, ``versions`` the libraries', ``table_versions`` the Delta version of
    each table written, ``stage_seconds`` wall seconds per stage, ``profile`` the
    ``--profile`` figures."""

    run_id: str
    job: str
    status: str
    error: str
    started_at: datetime
    ended_at: datetime
    duration_s: float
    inputs: list[str]
    lake: str
    config: str
    config_hash: str
    versions: dict[str, str]
    delta_writer: str
    spark_master: str
    slides_discovered: int
    slides_ok: int
    slides_error: int
    slides_unchanged: int
    slides_tiled: int
    slides_skipped: int
    masks_computed: int
    masks_reused: int
    masks_failed: int
    tiles_generated: int
    tiles_skipped: int
    tiles_decoded: int
    tiles_failed: int
    tiles_filtered: int
    tiles_written: int
    table_versions: dict[str, int]
    slide_counts: list[SlideCount]
    slide_errors: list[SlideError]
    stage_seconds: dict[str, float]
    profile: dict[str, float]


__all__ = ["Int32", "spark_schema", "LevelRow", "SlideRow", "Resolution", "ResolvedSlide", "MaskRow", "TileFailure", "SlideCount",
           "SlideError", "TileErrorRow", "RunSlideRow", "RunRow"]
