"""Tile pixel encodings stored in the ``tile`` column, and their inverse.

Formats (the ``tile_format`` column):

* ``raw``: uint8 RGB, C order, shape ``(tile_height, tile_width, 3)``; ``tobytes()``;
* ``png``: lossless PNG (imagecodecs/libpng, zlib level 1);
* ``jpeg``: baseline JPEG (imagecodecs/libjpeg-turbo), quality 1-100, 4:2:0 chroma subsampling;
* ``webp``: WebP (Pillow/libwebp); quality 100 means lossless.

Costs per 256 px tile on this project's machines are in ``docs/encoding.md``.
"""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
from PIL import Image

FORMATS = ("raw", "png", "jpeg", "webp")


def encode_tile(rgb: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    """Encode one tile.

    Args:
        rgb: uint8 array of shape ``(h, w, 3)``.
        encoding: one of :data:`FORMATS`.
        quality: 1-100 for ``jpeg`` and ``webp`` (ignored otherwise).

    Raises:
        ValueError: unknown encoding or an array that is not ``(h, w, 3)`` uint8.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    if encoding == "raw":
        return np.ascontiguousarray(rgb).tobytes()
    if encoding == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(rgb, level=quality))
    if encoding == "png":
        return bytes(imagecodecs.png_encode(rgb, level=1))
    if encoding == "webp":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="WEBP", quality=quality, lossless=quality >= 100)
        return buf.getvalue()
    raise ValueError(f"unknown tile encoding {encoding!r}; expected one of {FORMATS}")


def decode_tile(data: bytes, tile_format: str, width: int, height: int) -> np.ndarray:
    """Decode the ``tile`` column back to pixels.

    Args:
        data: the stored bytes.
        tile_format: the row's ``tile_format``.
        width, height: the row's ``tile_width``, ``tile_height`` (px at the tile resolution).

    Returns:
        uint8 array of shape ``(height, width, 3)``.

    Raises:
        ValueError: unknown format, or decoded shape differs from ``(height, width, 3)``.
    """
    if tile_format == "raw":
        arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != width * height * 3:
            raise ValueError(f"raw tile has {arr.size} bytes, expected {width * height * 3}")
        return arr.reshape(height, width, 3)
    if tile_format == "jpeg":
        arr = imagecodecs.jpeg8_decode(data)
    elif tile_format == "png":
        arr = imagecodecs.png_decode(data)
    elif tile_format == "webp":
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    else:
        raise ValueError(f"unknown tile format {tile_format!r}; expected one of {FORMATS}")
    if arr.shape != (height, width, 3):
        raise ValueError(f"decoded tile has shape {arr.shape}, expected {(height, width, 3)}")
    return arr
