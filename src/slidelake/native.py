"""Native-tile reader: decode a TIFF-based slide's own JPEG tiles, past OpenSlide's read overhead.

On a JPEG-tiled Aperio-style slide most of ``OpenSlide.read_region``'s time per 256 px tile is
overhead, not JPEG decoding (``../shared/GUIDE.md``; ``docs/benchmarks.md``). This reader finds
the TIFF page of a pyramid level (tifffile), reads each stored tile's bytes with one ``pread``,
decodes them with tifffile's decoder for that page (imagecodecs / libjpeg-turbo, with the page's
JPEG tables and colour space) and crops / assembles output regions from the decoded tiles. A
decoded stored tile is kept in a small LRU cache, so a task walking its tiles in raster order
decodes each stored tile about once.

It applies to levels stored as 8-bit RGB/YCbCr JPEG tiles of Aperio SVS and generic tiled TIFF
files (``openslide.vendor`` ``aperio`` or ``generic-tiff``); everything else (NDPI strips,
JPEG 2000, MRXS, DICOM, ...) is read by OpenSlide. On the real CMU sample its output equals
``read_region`` bit for bit.

libjpeg-turbo only *warns* about some corrupt data where OpenSlide fails the read, so every stored
tile is checked structurally first (:func:`check_jpeg`: SOI ... EOI, only stuffed bytes or
restart markers inside the entropy-coded data); a tile that fails the check or the decode raises
:class:`CorruptTileError` and the caller falls back to OpenSlide, which decides.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from collections import OrderedDict
from functools import partial
from typing import Any, Callable

import numpy as np

from slidelake.memory import LRU

NATIVE_VENDORS = ("aperio", "generic-tiff")
RANGED_READAHEAD = 8  # stored tiles per ranged GET of an object (NativeLevel's readahead)
JPEG = 7  # TIFF Compression tag value
WHITE = 255


# inside entropy-coded data 0xFF must be followed by 0x00 (stuffing) or a restart marker RST0-RST7
_BAD_IN_ENTROPY = re.compile(rb"\xff[^\x00\xd0-\xd7]", re.DOTALL)


class CorruptTileError(ValueError):
    """A stored tile's bytes are not a complete, well-formed JPEG stream or did not decode."""


def check_jpeg(data: bytes) -> None:
    """Check that ``data`` is one complete baseline JPEG stream (abbreviated streams without
    tables allowed).

    Checks: starts with SOI (FFD8), ends with EOI (FFD9), the marker segments before the first
    SOS (FFDA) are well formed, and inside the entropy-coded data every 0xFF byte is followed by
    0x00 (stuffing) or a restart marker (D0-D7).

    Raises:
        CorruptTileError: with the first problem found.
    """
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        raise CorruptTileError("stored tile does not start with a JPEG SOI marker")
    if data[-2:] != b"\xff\xd9":
        raise CorruptTileError("stored tile does not end with a JPEG EOI marker (truncated or overwritten)")
    p = 2
    while True:
        if p + 4 > n or data[p] != 0xFF:
            raise CorruptTileError(f"malformed JPEG marker segment at byte {p}")
        marker = data[p + 1]
        length = (data[p + 2] << 8) | data[p + 3]
        if length < 2 or p + 2 + length > n:
            raise CorruptTileError(f"JPEG segment 0x{marker:02x} at byte {p} runs past the data")
        p += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
    # one C scan (a regular expression with a literal first byte) instead of NumPy masks: ~2x faster
    end = n - 2
    if end > p and data[end - 1] == 0xFF:
        raise CorruptTileError("JPEG entropy data ends with a lone 0xFF")
    bad = _BAD_IN_ENTROPY.search(data, p, end)
    if bad is not None:
        k = bad.start()
        raise CorruptTileError(f"invalid marker 0xff{data[k + 1]:02x} inside JPEG entropy data at byte {k}")


class NativeLevel:
    """One pyramid level stored as JPEG tiles (a tifffile page), readable by region.

    Args:
        pread: ``pread(nbytes, offset) -> bytes`` of the slide's file (``os.pread`` of an open
            descriptor, or :meth:`slidelake.storage.RangedFile.read_at` of an object).
        page: the ``tifffile.TiffPage`` of the level.
        cache_tiles: decoded stored tiles kept (LRU); memory ~ ``cache_tiles * tile_w * tile_h * 3``.
        readahead: stored tiles fetched by one read: a tile's read also fetches the tiles after
            it in the same row whose bytes follow its own in the file, up to ``readahead`` in
            all, and keeps their bytes (at most ``2 * readahead``) for when they are needed;
            for ranged GETs, where a request costs far more than its bytes. 1: one read each.
    """

    def __init__(self, pread: Callable[[int, int], bytes], page: Any, cache_tiles: int = 64,
                 readahead: int = 1) -> None:
        self.pread = pread
        self.readahead = readahead
        self._ahead: OrderedDict[int, bytes] = OrderedDict()
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.across = math.ceil(self.width / self.tile_w)
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.tables = page.jpegtables
        self._decode = page.decode
        self._cache = LRU(cache_tiles)

    def stored_tile(self, col: int, row: int, cache: bool = True) -> np.ndarray | None:
        """Decoded stored tile ``(tile_h, tile_w, 3)`` uint8, or None for a tile absent from the
        file (byte count 0: OpenSlide paints it transparent, i.e. white here). With ``cache``
        false the tile is decoded without touching the cache (safe from several threads).

        Raises:
            CorruptTileError: bad JPEG structure or a decoder error.
        """
        idx = row * self.across + col
        return self._cache.get(idx, lambda: self._decode_tile(idx)) if cache else self._decode_tile(idx)

    def _decode_tile(self, idx: int) -> np.ndarray | None:
        count = int(self.counts[idx])
        if not count:
            return None
        data = self._ahead.pop(idx, None)
        if data is None:
            data = self._fetch(idx, count)
        check_jpeg(data)
        try:
            seg, _, _ = self._decode(data, idx, jpegtables=self.tables)
        except Exception as exc:  # noqa: BLE001 - imagecodecs raises its own error types
            raise CorruptTileError(f"stored tile {idx}: {type(exc).__name__}: {exc}") from None
        return seg.reshape(seg.shape[-3:])[..., :3]

    def _fetch(self, idx: int, count: int) -> bytes:
        """Bytes of stored tile ``idx``; with ``readahead``, in one read with the tiles after it
        in its row whose bytes follow on (kept in ``_ahead``)."""
        start = int(self.offsets[idx])
        end, last = start + count, idx
        row_end = min((idx // self.across + 1) * self.across, idx + self.readahead)
        while last + 1 < row_end and int(self.counts[last + 1]) and int(self.offsets[last + 1]) == end:
            last += 1
            end += int(self.counts[last])
        blob = self.pread(end - start, start)
        for j in range(idx + 1, last + 1):
            o = int(self.offsets[j]) - start
            self._ahead[j] = blob[o:o + int(self.counts[j])]
        while len(self._ahead) > 2 * self.readahead:
            self._ahead.popitem(last=False)
        return blob[:count]

    def read(self, x: int, y: int, w: int, h: int, cache: bool = True) -> np.ndarray:
        """Region ``[x, x + w) x [y, y + h)`` in px of this level, uint8 ``(h, w, 3)``; pixels
        outside the level are white (as OpenSlide's transparent pixels composited on white).
        A region that is exactly one stored tile is returned as a read-only view of the decoded
        (cached) tile; copy it before writing into it. ``cache``: see :meth:`stored_tile`
        (false for a region read once, e.g. by a mask, or by several threads at once).

        Raises:
            CorruptTileError: a stored tile under the region is corrupt.
        """
        tw, th = self.tile_w, self.tile_h
        if cache and (w, h) == (tw, th) and x % tw == 0 and y % th == 0 and 0 <= x and x + w <= self.width \
                and 0 <= y and y + h <= self.height:
            # the region is one whole stored tile (the usual case when the tile grid matches the
            # file's): the decoded tile itself, read-only, saves filling and copying 192 KiB
            tile = self.stored_tile(x // tw, y // th)
            if tile is not None:
                view = tile.view()
                view.flags.writeable = False
                return view
        out = np.full((h, w, 3), WHITE, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for row in range(y0 // th, (y1 - 1) // th + 1):
            ty = row * th
            sy0, sy1 = max(y0, ty), min(y1, ty + th)
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tx = col * tw
                sx0, sx1 = max(x0, tx), min(x1, tx + tw)
                tile = self.stored_tile(col, row, cache)
                if tile is not None:
                    out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx]
        return out


def _eligible(page: Any) -> bool:
    return (
        page.is_tiled and int(page.compression) == JPEG and page.samplesperpixel == 3
        and int(page.planarconfig) == 1 and page.bitspersample == 8 and int(page.photometric) in (2, 6)
        and page.imagedepth == 1
    )


class NativeSlide:
    """Native readers for the levels of one slide that qualify (see the module docstring).

    Args:
        source: the slide file's path, or a :class:`slidelake.storage.RangedFile` of the object
            (its TIFF header read through a 64 KiB buffer, each stored tile by one ranged GET);
            unused (may be None) for a vendor outside :data:`NATIVE_VENDORS`.
        level_dimensions: OpenSlide's ``level_dimensions`` (``(w, h)`` per level); each level is
            matched to the first tiled TIFF page of the same size not matched yet, in file order.
        vendor: OpenSlide's ``openslide.vendor``; other vendors get no native levels.
        cache_tiles: see :class:`NativeLevel`.
    """

    def __init__(self, source: Any, level_dimensions: list[tuple[int, int]], vendor: str | None,
                 cache_tiles: int = 64) -> None:
        self.levels: dict[int, NativeLevel] = {}
        self._tf = None
        self._fd = None
        self._source = None
        if vendor not in NATIVE_VENDORS:
            return
        import tifffile

        if isinstance(source, str):
            self._tf = tifffile.TiffFile(source)
            self._fd = os.open(source, os.O_RDONLY)
            pread = partial(os.pread, self._fd)
        else:
            self._source = source
            self._tf = tifffile.TiffFile(io.BufferedReader(source, 1 << 16))
            pread = source.read_at
        readahead = 1 if isinstance(source, str) else RANGED_READAHEAD
        pages = [p for p in self._tf.pages if p.is_tiled]
        used: set[int] = set()
        for k, (w, h) in enumerate(level_dimensions):
            for i, p in enumerate(pages):
                if i not in used and (int(p.imagewidth), int(p.imagelength)) == (int(w), int(h)):
                    used.add(i)
                    if _eligible(p):
                        self.levels[k] = NativeLevel(pread, p, cache_tiles, readahead)
                    break

    def level(self, k: int) -> NativeLevel | None:
        """The native reader of level ``k``, or None when that level must be read by OpenSlide."""
        return self.levels.get(int(k))

    def drop_cached_tiles(self) -> None:
        """Forget the decoded stored tiles of every level (the handle stays open); a task does
        this when it ends, so an idle worker does not hold them."""
        for lvl in self.levels.values():
            lvl._cache.drop()
            lvl._ahead.clear()

    def close(self) -> None:
        """Release the file handles."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tf is not None:
            self._tf.close()
            self._tf = None
        if self._source is not None:
            self._source.close()
            self._source = None


class LevelGeometry:
    """The OpenSlide calls :func:`slidelake.masks.read_slide_at` makes (``dimensions``,
    ``level_dimensions``, ``level_downsamples``, ``get_best_level_for_downsample``,
    ``read_region``) for a slide read from its native levels without a local file (an object
    read by ranged GETs): the level sizes (px) and downsamples come from its ``slides`` row's
    ``levels``; ``read_region``, for a region the native reader cannot give, opens
    ``open_slide()`` (an ``openslide.OpenSlide`` of a local copy) the first time.
    """

    def __init__(self, levels: list[Any], open_slide: Callable[[], Any]) -> None:
        self.level_dimensions = [(int(v["width"]), int(v["height"])) for v in levels]
        self.level_downsamples = [float(v["downsample"]) for v in levels]
        self.dimensions = self.level_dimensions[0]
        self._open, self._slide, self._lock = open_slide, None, threading.Lock()

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """OpenSlide's rule (``openslide_get_best_level_for_downsample``): the last level whose
        downsample is at most ``downsample``; level 0 below it."""
        below = [k for k, d in enumerate(self.level_downsamples) if d <= downsample]
        return below[-1] if below else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        with self._lock:
            if self._slide is None:
                self._slide = self._open()
        return self._slide.read_region(location, level, size)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()


def open_native(path: str, cache_tiles: int = 64, slide: Any = None) -> NativeSlide:
    """A :class:`NativeSlide` for ``path`` using OpenSlide for the level sizes and vendor
    (``slide``: an ``openslide.OpenSlide`` of ``path`` already open, else one is opened).

    Raises:
        What ``openslide.OpenSlide`` or ``tifffile.TiffFile`` raise for unreadable files.
    """
    if slide is None:
        import openslide

        with openslide.OpenSlide(path) as osr:
            return open_native(path, cache_tiles, osr)
    return NativeSlide(path, list(slide.level_dimensions), slide.properties.get("openslide.vendor"), cache_tiles)


__all__ = ["CorruptTileError", "check_jpeg", "NativeLevel", "NativeSlide", "LevelGeometry", "open_native",
           "NATIVE_VENDORS"]
