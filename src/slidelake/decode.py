"""Repartition tile rows and decode their pixels in a vectorized Python UDF.

* :func:`repartition_tiles` deals the regions of ``region_tiles`` x ``region_tiles`` tiles out to
  the tasks on a diagonal lattice (:func:`region_task`), so neighbouring tiles of one slide stay
  in one task and the tasks get even shares of the tissue, then sorts each partition region by
  region, in raster order within a region, so reads walk the file forwards.
* :class:`TileDecoder` (used by :mod:`slidelake.write`'s ``mapInArrow`` file sink) reads each
  tile's region at its level, from the file's own JPEG tiles
  (:mod:`slidelake.native`) where the level qualifies, else with ``OpenSlide.read_region`` at
  the row's level-0 coordinates (transparent pixels composited on white); resizes when
  resampling (Pillow Lanczos), encodes the tile and computes cheap statistics. A tile the
  native reader finds corrupt is re-read by OpenSlide, which decides.

One OpenSlide handle and one native reader per slide per Python worker process are kept in LRU
caches (:class:`slidelake.memory.LRU`) and reused across batches and tasks (``spark.python.worker.reuse``).
Memory of a worker is bounded by ``decode.batch_size`` tiles and ``decode.batch_mb`` MiB of
uncompressed pixels per output batch, whatever the slide's size.
A tile that fails to decode gets ``decode_error`` set and no pixels; the slide goes on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from slidelake.config import DecodeConfig, PartitionConfig, StorageConfig
from slidelake.encoding import encode_tile
from slidelake.memory import LRU, peak_rss_mib, trim_heap
from slidelake.native import NATIVE_VENDORS, CorruptTileError, NativeSlide, open_native
from slidelake.slide_cache import cached_copy, local_copy
from slidelake.storage import RangedFile, is_remote

DECODE_FIELDS = [
    T.StructField("tile", T.BinaryType(), True),
    T.StructField("tile_format", T.StringType(), True),
    T.StructField("tile_width", T.IntegerType(), True),
    T.StructField("tile_height", T.IntegerType(), True),
    T.StructField("tile_mean", T.DoubleType(), True),
    T.StructField("tile_std", T.DoubleType(), True),
    T.StructField("background_fraction", T.DoubleType(), True),
    T.StructField("reader", T.StringType(), True),
    T.StructField("decode_error", T.StringType(), True),
]


def partition_count(expected_tiles: float, tiles_per_partition: int, parallelism: int) -> int:
    """Number of decode tasks: ``ceil(expected_tiles / tiles_per_partition)`` rounded up to a
    multiple of ``parallelism`` (Spark's default parallelism, the cores), so the last wave of
    tasks keeps every core busy; at least ``parallelism``.

    ``expected_tiles`` is the number of tiles expected to reach the decoder (with masks: each
    slide's grid size times its mask's tissue fraction), not the grid size: sizing tasks by the
    grid made the tasks of a slide with little tissue uneven (``docs/benchmarks.md``).
    """
    p = max(1, int(parallelism))
    n = max(1, math.ceil(max(0.0, float(expected_tiles)) / tiles_per_partition))
    return p * math.ceil(n / p)


# regions of one grid row of regions go to consecutive tasks; the next row starts this many
# tasks further on, so the lattice runs diagonally and a column of regions is spread too
REGION_ROW_STEP = 3


def region_task(region_row: Any, region_col: Any, slide_offset: Any, n: int) -> Any:
    """The decode task of a region: ``(region_col + REGION_ROW_STEP * region_row + slide_offset)
    mod n``, a diagonal lattice over the slide's regions.

    Neighbouring regions go to different tasks, so each task gets an even share of every part
    of the slide: tissue is spatially smooth. On the kept tiles of the benchmark slides the
    largest of 4 tasks holds 1.01-1.02x the mean tile count against 1.08-1.20x (median of random
    draws) for a hash of the region, the largest of 18 tasks 1.04-1.12x against 1.3-1.7x
    (``docs/benchmarks.md``). Works on NumPy arrays and on Spark columns alike
    (``%`` of non-negative operands).

    Args:
        region_row, region_col: the region's indices in the slide's grid (tile row // region
            tiles, tile column // region tiles), >= 0.
        slide_offset: a per-slide phase in ``[0, n)`` so slides do not all start on task 0.
        n: number of tasks, >= 1.
    """
    return (region_col + REGION_ROW_STEP * region_row + slide_offset) % n


def repartition_tiles(tiles: DataFrame, cfg: PartitionConfig, expected_tiles: float) -> DataFrame:
    """Spread tile rows over tasks by ``(slide_id, region)`` and sort them in raster order.

    Args:
        tiles: grid rows (needs ``slide_id``, ``tile_col``, ``tile_row``, ``tile_x``, ``tile_y``).
        cfg: region size (in tiles) and target tiles per partition.
        expected_tiles: tiles expected to be decoded (see :func:`partition_count`).

    Returns:
        The same rows in :func:`partition_count` partitions, every region of ``region_tiles`` x
        ``region_tiles`` tiles in one partition, chosen by :func:`region_task` (Spark >= 4.1,
        ``repartitionById``; older Spark hashes ``(slide_id, region_row, region_col)``), each
        sorted region by region and in raster order within a region (``slide_id, region_row,
        region_col, tile_y, tile_x``): the native reader's cache of decoded stored tiles
        (``decode.native_cache_tiles``) then only has to span a region's width, not the
        slide's, for each stored tile to be decoded once.
    """
    spark = tiles.sparkSession
    n = partition_count(expected_tiles, cfg.tiles_per_partition, spark.sparkContext.defaultParallelism)
    r = cfg.region_tiles
    # the region as expressions, not columns: two DataFrame calls (each a Catalyst analysis of
    # the whole plan, on the driver between the mask and the first job) fewer
    region_row, region_col = F.floor(F.col("tile_row") / r), F.floor(F.col("tile_col") / r)
    if hasattr(tiles, "repartitionById"):
        task = region_task(region_row, region_col, F.pmod(F.xxhash64("slide_id"), F.lit(n)), n)
        spread = tiles.repartitionById(n, task.cast("int"))
    else:  # Spark < 4.1 (e.g. Databricks Runtime 17, EMR 7)
        spread = tiles.repartition(n, "slide_id", region_row, region_col)
    return spread.sortWithinPartitions("slide_id", region_row, region_col, "tile_y", "tile_x")


def _open_openslide(path: str) -> Any:
    import openslide

    return openslide.OpenSlide(path)


# per Python worker process (reused across tasks), keyed by (path, fingerprint): open OpenSlide
# handles and native readers, at most ``decode.max_open_slides`` of each
_OPENSLIDE = LRU(8, close=lambda h: h.close())
_NATIVE = LRU(8, close=lambda h: h.close())


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 array ``(h, w, 4)`` on white; returns uint8 ``(h, w, 3)``.

    OpenSlide returns transparent pixels (alpha 0) outside the slide and, for some formats,
    between scanned regions; they become white, the usual brightfield background.
    """
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32)[..., None] / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def read_tile(
    slide: Any,
    level0_x: int,
    level0_y: int,
    level: int,
    read_size: tuple[int, int],
    out_size: tuple[int, int],
    valid_size: tuple[int, int],
) -> np.ndarray:
    """Read one tile's pixels.

    Args:
        slide: an ``openslide.OpenSlide``.
        level0_x, level0_y: top-left in level-0 px.
        level: level to read.
        read_size: ``(w, h)`` in px of ``level``.
        out_size: ``(w, h)`` of the tile in tile px (resized to it when it differs from
            ``read_size``, Lanczos).
        valid_size: ``(w, h)`` of the part inside the slide, in tile px; the rest is white.

    Returns:
        uint8 ``(out_h, out_w, 3)``.
    """
    region = np.asarray(slide.read_region((int(level0_x), int(level0_y)), int(level), read_size))
    return finish_tile(rgba_to_rgb(region), out_size, valid_size)


def finish_tile(rgb: np.ndarray, out_size: tuple[int, int], valid_size: tuple[int, int]) -> np.ndarray:
    """Resize a read region uint8 ``(h, w, 3)`` to ``out_size`` ``(w, h)`` (Lanczos, only when the
    sizes differ) and paint white the part beyond ``valid_size`` (tile px outside the slide)."""
    read_size = (rgb.shape[1], rgb.shape[0])
    if tuple(read_size) != tuple(out_size):
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).resize(out_size, Image.Resampling.LANCZOS))
    vw, vh = valid_size
    if vw < out_size[0] or vh < out_size[1]:
        rgb = rgb.copy()
        rgb[:, vw:] = 255
        rgb[vh:, :] = 255
    return rgb


def tile_stats(rgb: np.ndarray, background_threshold: int) -> tuple[float, float, float]:
    """``(mean, std, background_fraction)`` of a uint8 ``(h, w, 3)`` tile.

    mean and std are of the grey level (mean of R, G, B; 0-255; population std); a pixel is
    background when its darkest channel is >= ``background_threshold`` (near white).

    The channels are first copied into three contiguous planes (one pass): element-wise
    operations on the interleaved channel views, or reductions over a last axis of length 3,
    are several times slower. The moments are exact: ``R + G + B`` per pixel is an integer
    <= 765, so its sum and sum of squares (float64 dot product, < 2**53) carry no rounding
    (``docs/benchmarks.md`` has the timings).
    """
    r, g, b = np.moveaxis(rgb, 2, 0).copy()  # (3, h, w) contiguous planes
    total = r.astype(np.uint16)
    total += g
    total += b  # R + G + B, 0-765
    grey3 = total.ravel().astype(np.float64)
    n = grey3.size
    mean = float(grey3.sum()) / n
    var = max(float(np.dot(grey3, grey3)) / n - mean * mean, 0.0)
    darkest = np.minimum(r, g)
    np.minimum(darkest, b, out=darkest)
    return mean / 3.0, math.sqrt(var) / 3.0, float(np.count_nonzero(darkest >= background_threshold)) / n


MAX_BINARY_BYTES = 2**31 - 1  # the most bytes one Arrow ``binary`` array holds (int32 offsets)


def tile_column(tiles: Sequence[bytes | np.ndarray]) -> Any:
    """The ``tile`` column (a ``pyarrow`` ``binary`` array) of a batch's kept tiles.

    Encoded tiles (``bytes``) go into the column as they are. Pixel arrays (the ``raw``
    encoding with :class:`TileDecoder` ``raw_pixels``) are copied once, each C-contiguous
    array's bytes (row-major ``(h, w, 3)``, as ``ndarray.tobytes``) straight into one buffer of
    Arrow's memory pool, instead of into a ``bytes`` per tile and then into the column.

    Args:
        tiles: not None; all ``bytes`` or all C-contiguous uint8 arrays.
    """
    import pyarrow as pa

    if not tiles or not isinstance(tiles[0], np.ndarray):
        return pa.array(tiles, pa.binary())
    sizes = np.fromiter((t.nbytes for t in tiles), np.int64, len(tiles))
    total = int(sizes.sum())
    if total > MAX_BINARY_BYTES:  # beyond binary's 32-bit offsets: Arrow splits it into chunks
        return pa.array([t.tobytes() for t in tiles], pa.binary())
    offsets = np.zeros(len(tiles) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    data = pa.allocate_buffer(total)
    dst = np.frombuffer(data, np.uint8)
    for t, start in zip(tiles, offsets[:-1].tolist()):
        dst[start:start + t.nbytes] = t.reshape(-1)
    return pa.Array.from_buffers(pa.binary(), len(tiles), [None, pa.py_buffer(offsets), data])


# columns of a batch the decoder reads, as NumPy arrays; everything else is passed through untouched
DECODE_COLUMNS = (
    "path", "fingerprint", "level0_x", "level0_y", "level", "level_downsample", "read_width", "read_height",
    "tile_extent_x", "tile_extent_y", "valid_width", "valid_height", "tile_x", "tile_y", "slide_id",
)


@dataclass
class DecodedBatch:
    """What :meth:`TileDecoder.decode` made of ``n`` rows (index ``i`` is the row's position).

    Attributes:
        tiles: encoded tile bytes, ``None`` where the decode failed; with ``raw_pixels`` (see
            :class:`TileDecoder`) and encoding ``raw`` the tile's C-contiguous uint8 ``(h, w, 3)``
            pixels instead, whose bytes are the ``raw`` value (:func:`tile_column` copies them
            into the Arrow column).
        mean, std, background_fraction: float64 ``(n,)`` statistics of :func:`tile_stats`
            (NaN where the decode failed).
        readers: ``native`` or ``openslide`` per row (``None`` where it failed).
        errors: the error message per row (``None`` where it succeeded).
        encode_s: seconds spent encoding; seconds: the whole batch.
        fetched_bytes: bytes fetched from object storage by ranged reads in the batch.
    """

    tiles: list[bytes | None]
    mean: np.ndarray
    std: np.ndarray
    background_fraction: np.ndarray
    readers: list[str | None]
    errors: list[str | None]
    encode_s: float = 0.0
    seconds: float = 0.0
    fetched_bytes: int = 0


class TileDecoder:
    """Reads, encodes and measures tiles given as NumPy columns (:data:`DECODE_COLUMNS`), with the
    worker's cached slide handles: the file's own JPEG tiles (:mod:`slidelake.native`) where
    the level qualifies, else ``OpenSlide.read_region`` (a tile the native reader finds corrupt
    is re-read by OpenSlide, which decides). Used by the workers' file sink
    (:func:`slidelake.write.make_file_sink`).

    ``raw_pixels``: with encoding ``raw``, keep each tile's pixels as an array
    (:attr:`DecodedBatch.tiles`) instead of copying them into a ``bytes`` of their own; the file
    sink then copies the kept ones once, straight into the batch's Arrow column
    (:func:`tile_column`): one copy of 192 KiB per 256 px tile fewer.
    Slides at ``s3://`` URIs (reached with ``storage``) are read from their copy in this
    machine's slide cache when it holds a current one (:func:`slidelake.slide_cache.cached_copy`,
    e.g. left by discovery); otherwise the levels the native reader takes are read from the
    object by ranged GETs (:class:`slidelake.storage.RangedFile`; one per stored tile, never
    the whole file), given the slide's OpenSlide vendor and level sizes in ``remote_levels``
    (``{uri: (vendor, [(width, height) per level])}``, the ``slides`` row's ``vendor`` and
    ``levels``), and every other read is OpenSlide's, of a copy made then
    (:func:`slidelake.slide_cache.local_copy`).
    """

    def __init__(self, cfg: DecodeConfig, raw_pixels: bool = False, storage: StorageConfig | None = None,
                 remote_levels: dict[str, tuple[str | None, list[tuple[int, int]]]] | None = None) -> None:
        self.encoding, self.quality, self.threshold = cfg.encoding, cfg.quality, cfg.background_threshold
        self.raw_pixels = raw_pixels and cfg.encoding == "raw"
        self.batch_size, self.batch_mb = cfg.batch_size, cfg.batch_mb
        self.handles, self.natives = _OPENSLIDE, (_NATIVE if cfg.reader == "auto" else None)
        _OPENSLIDE.size = _NATIVE.size = cfg.max_open_slides
        self.cache_tiles = cfg.native_cache_tiles
        self.storage = storage
        self.remote_levels = remote_levels or {}

    def rows_per_batch(self, extent_x: int, extent_y: int) -> int:
        """Rows per output batch: at most ``decode.batch_size`` and ``decode.batch_mb`` MiB of
        uncompressed RGB tiles of ``extent_x`` x ``extent_y`` px."""
        return max(1, min(self.batch_size, int(self.batch_mb * 2**20) // max(1, extent_x * extent_y * 3)))

    def decode(self, col: dict[str, np.ndarray]) -> DecodedBatch:
        """Decode every row of ``col`` (equal-length arrays keyed by :data:`DECODE_COLUMNS`).
        Never raises for a bad tile or file: the row gets its error instead."""
        t_batch, fetched = time.perf_counter(), RangedFile.fetched
        n = len(col["path"])
        out = DecodedBatch([None] * n, np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan),
                           [None] * n, [None] * n)
        handles, natives = self.handles, self.natives
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(col["path"], col["fingerprint"])):
            groups.setdefault(key, []).append(i)
        for (path, fp), idx in groups.items():
            slide = None
            native = None
            open_error = None  # a file OpenSlide cannot open is tried once per batch, not per tile
            if natives is not None:
                try:
                    native = natives.get((path, fp), lambda: self._open_native(path))
                except Exception:  # noqa: BLE001 - OpenSlide below reports the problem
                    native = None
            for i in idx:
                out_size = (int(col["tile_extent_x"][i]), int(col["tile_extent_y"][i]))
                valid = (int(col["valid_width"][i]), int(col["valid_height"][i]))
                read_size = (int(col["read_width"][i]), int(col["read_height"][i]))
                # 1. pixels: the file's own JPEG tiles where the level qualifies, else OpenSlide
                rgb, reader = None, None
                lvl = native.level(col["level"][i]) if native is not None else None
                if lvl is not None:
                    ds = float(col["level_downsample"][i])
                    try:
                        region = lvl.read(round(col["level0_x"][i] / ds), round(col["level0_y"][i] / ds), *read_size)
                        rgb, reader = finish_tile(region, out_size, valid), "native"
                    except CorruptTileError:
                        pass  # OpenSlide decides whether the tile is readable
                if rgb is None:
                    if slide is None and open_error is None:
                        try:
                            slide = handles.get((path, fp), lambda: _open_openslide(
                                local_copy(path, self.storage)[0] if is_remote(path) else path))
                        except Exception as exc:  # noqa: BLE001 - file gone or unreadable
                            open_error = f"open failed: {type(exc).__name__}: {exc}"
                    if open_error is not None:
                        out.errors[i] = open_error
                        continue
                    try:
                        rgb = read_tile(slide, col["level0_x"][i], col["level0_y"][i], col["level"][i],
                                        read_size, out_size, valid)
                        reader = "openslide"
                    except Exception as exc:  # noqa: BLE001 - recorded per tile
                        out.errors[i] = f"{type(exc).__name__}: {exc}"
                        handles.drop((path, fp))  # handles are unusable after an error
                        slide = None
                        continue
                # 2. encoding and statistics, whichever reader gave the pixels
                t0 = time.perf_counter()
                out.tiles[i] = (np.ascontiguousarray(rgb) if self.raw_pixels
                                else encode_tile(rgb, self.encoding, self.quality))
                out.encode_s += time.perf_counter() - t0
                out.mean[i], out.std[i], out.background_fraction[i] = tile_stats(rgb, self.threshold)
                out.readers[i] = reader
        out.seconds, out.fetched_bytes = time.perf_counter() - t_batch, RangedFile.fetched - fetched
        return out

    def _open_native(self, path: str) -> NativeSlide:
        """The native reader of a file, of an object's copy cached on this machine, or of the
        object by ranged reads (``remote_levels``)."""
        local = cached_copy(path, self.storage) if is_remote(path) else path
        if local is not None:
            return open_native(local, self.cache_tiles)
        vendor, dims = self.remote_levels.get(path, (None, []))
        source = RangedFile(path, self.storage) if vendor in NATIVE_VENDORS else None
        return NativeSlide(source, dims, vendor, self.cache_tiles)

    def end_task(self) -> None:
        """Drop the decoded stored tiles the native readers cache (they serve the task's raster
        walk; the open handles stay for the next task) and return freed heap pages to the OS
        (:func:`slidelake.memory.trim_heap`; no ``gc.collect``: the arrays are freed by their
        reference counts, and a full collection of a worker's heap took 35-80 ms per task,
        ``docs/benchmarks.md``)."""
        if self.natives is not None:
            for native in self.natives.items.values():
                native.drop_cached_tiles()
        trim_heap()

    def profile(self, d: DecodedBatch) -> dict[str, float]:
        """The ``--profile`` figures of one batch: seconds reading pixels (``decode.read_s``),
        encoding (``decode.encode_s``) and in the whole batch (``decode.batch_s``), tiles per
        reader, bytes fetched from object storage by ranged reads (``decode.fetched_bytes``), and the worker's peak resident set in this stage so far
        (``decode.worker_peak_mib``, :mod:`slidelake.memory`)."""
        return {"decode.batch_s": d.seconds, "decode.encode_s": d.encode_s, "decode.read_s": d.seconds - d.encode_s,
                "decode.tiles": float(len(d.tiles)),
                "decode.tiles_native": float(sum(r == "native" for r in d.readers)),
                "decode.fetched_bytes": float(d.fetched_bytes),
                "decode.worker_peak_mib": peak_rss_mib()}
