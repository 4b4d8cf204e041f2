"""Make a SYNTHETIC Aperio-style benchmark slide (pyramidal, JPEG-tiled SVS).

No large real slide may be redistributed here, so the benchmark builds its own: level 0 of
``width x height`` px at 0.25 µm/px (40x), 256 px JPEG tiles (YCbCr 4:2:0, like scanners
write), levels at downsample 4 and 16 (the Aperio layout), an ``Aperio Image Library``
ImageDescription with ``MPP`` and ``AppMag`` so OpenSlide reads it as an Aperio slide.

Content: tissue-like texture (the real CMU-1 H&E sample, mirrored and tiled) inside a few
ellipses covering about ``tissue`` of the area, slightly noisy near-white glass elsewhere. Every
level is generated from the same geometry, tile by tile, so memory stays small whatever the
size.

    python bench/make_slide.py bench/data/synthetic-40x.svs --width 40960 --height 30720
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path

import numpy as np

TILE = 256
MPP = 0.25
DOWNSAMPLES = (1, 4, 16)


def ellipses(width: int, height: int, tissue: float, seed: int = 7) -> np.ndarray:
    """``(k, 4)`` ellipses ``cx, cy, rx, ry`` in level-0 px covering about ``tissue`` of the
    area (non-overlapping bands across the slide)."""
    rng = np.random.default_rng(seed)
    k = 3
    area_each = tissue * width * height / k
    out = []
    for i in range(k):
        cx = width * (i + 0.5) / k
        cy = height * rng.uniform(0.4, 0.6)
        ry = height * 0.42
        rx = area_each / (math.pi * ry)
        out.append((cx, cy, min(rx, width / (2 * k)), ry))
    return np.array(out)


@functools.lru_cache(maxsize=2)
def _tissue_crop(source: str, win: int = 768) -> np.ndarray:
    """The most tissue-rich ``win`` px window of ``source``'s level 0 (HSV saturation > 0.15)."""
    import openslide

    with openslide.OpenSlide(source) as s:
        full = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    mx, mn = full.max(axis=2).astype(np.float32), full.min(axis=2).astype(np.float32)
    stained = (mx - mn) > 0.15 * np.maximum(mx, 1)
    sat = np.zeros((full.shape[0] + 1, full.shape[1] + 1))
    sat[1:, 1:] = stained.cumsum(0).cumsum(1)
    best, by, bx = -1.0, 0, 0
    for y in range(0, full.shape[0] - win + 1, 64):
        for x in range(0, full.shape[1] - win + 1, 64):
            v = sat[y + win, x + win] - sat[y, x + win] - sat[y + win, x] + sat[y, x]
            if v > best:
                best, by, bx = v, y, x
    return full[by:by + win, bx:bx + win].copy()


def _texture(source: str, downsample: int) -> np.ndarray:
    """The tissue-rich crop of ``source`` at ``1 / downsample`` scale, mirrored 2 x 2 (seamless)."""
    from PIL import Image

    img = Image.fromarray(_tissue_crop(source))
    if downsample > 1:
        img = img.resize((img.width // downsample, img.height // downsample), Image.Resampling.BOX)
    a = np.asarray(img)
    a = np.concatenate([a, a[:, ::-1]], axis=1)
    return np.concatenate([a, a[::-1]], axis=0)


def tile_pixels(col: int, row: int, level_w: int, level_h: int, ds: int, tex: np.ndarray,
                ell: np.ndarray, glass: list[np.ndarray]) -> np.ndarray:
    """One stored tile (TILE x TILE x 3 uint8 RGB) of the level with downsample ``ds``;
    ``glass`` is a bank of noisy near-white background tiles."""
    y0, x0 = row * TILE, col * TILE
    out = glass[(col * 7 + row * 13) % len(glass)].copy()
    # level-0 box of the tile, to skip the per-pixel test where no ellipse reaches
    bx0, by0, bx1, by1 = x0 * ds, y0 * ds, (x0 + TILE) * ds, (y0 + TILE) * ds
    near = [(cx, cy, rx, ry) for cx, cy, rx, ry in ell
            if bx1 >= cx - rx and bx0 <= cx + rx and by1 >= cy - ry and by0 <= cy + ry]
    if near:
        yy, xx = np.mgrid[y0:y0 + TILE, x0:x0 + TILE]
        X, Y = (xx + 0.5) * ds, (yy + 0.5) * ds
        inside = np.zeros((TILE, TILE), bool)
        for cx, cy, rx, ry in near:
            inside |= ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0
        if inside.any():
            th, tw = tex.shape[:2]
            out[inside] = tex[yy[inside] % th, xx[inside] % tw]
    if x0 + TILE > level_w:
        out[:, max(0, level_w - x0):] = 255
    if y0 + TILE > level_h:
        out[max(0, level_h - y0):] = 255
    return out


def make_slide(path: str | os.PathLike, width: int = 40960, height: int = 30720, tissue: float = 0.3,
               quality: int = 85, source: str | None = None, seed: int = 0) -> dict:
    """Write the synthetic slide; returns its description (size, levels, tissue geometry).

    Args:
        path: output ``.svs`` path (parent folders are created).
        width, height: level-0 size in px.
        tissue: fraction of the area inside the tissue ellipses (about 0.3 by default).
        quality: JPEG quality of the stored tiles.
        source: an H&E slide whose level 0 gives the texture (default: the CMU-1 sample in
            ``$SLIDELAKE_TEST_SLIDES`` or ``../shared/slides``).
        seed: varies the tissue ellipses' vertical places and the glass noise, so slides made
            with different seeds are different files (``0``: the benchmark slide).
    """
    import tifffile
    from PIL import Image

    if source is None:
        root = Path(os.environ.get("SLIDELAKE_TEST_SLIDES", Path(__file__).resolve().parents[2] / "shared" / "slides"))
        source = str(root / "aperio" / "CMU-1-Small-Region.svs")
    ell = ellipses(width, height, tissue, seed=7 + seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    desc = (f"Aperio Image Library v12.0.15 SYNTHETIC slidelake benchmark slide\r\n{width}x{height} [0,0 {width}x{height}] "
            f"({TILE}x{TILE}) JPEG/RGB Q={quality}|AppMag = 40|MPP = {MPP}|Synthetic = yes")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**32 - 2**28) as tw:
        for k, ds in enumerate(DOWNSAMPLES):
            lw, lh = math.ceil(width / ds), math.ceil(height / ds)
            if k and max(lw, lh) < TILE:
                break
            tex = _texture(source, ds)
            rng = np.random.default_rng(seed + k)
            glass = [np.clip(242 + rng.normal(0, 2.0, (TILE, TILE, 3)), 0, 255).astype(np.uint8) for _ in range(16)]
            across, down = math.ceil(lw / TILE), math.ceil(lh / TILE)
            # scanners store YCbCr 4:2:0 JPEG; tifffile expects the samples already in YCbCr
            tiles = (np.asarray(Image.fromarray(tile_pixels(c, r, lw, lh, ds, tex, ell, glass)).convert("YCbCr"))
                     for r in range(down) for c in range(across))
            tw.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="ycbcr",
                     subsampling=(2, 2), compression="jpeg", compressionargs={"level": quality}, description=desc if k == 0 else None,
                     subfiletype=0 if k == 0 else 1, metadata=None)
    os.replace(tmp, path)
    area = float(np.sum(np.pi * ell[:, 2] * ell[:, 3]) / (width * height))
    return {"path": str(path), "width": width, "height": height, "mpp": MPP, "tile": TILE,
            "downsamples": list(DOWNSAMPLES), "tissue_area_fraction": area, "synthetic": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--width", type=int, default=40960)
    ap.add_argument("--height", type=int, default=30720)
    ap.add_argument("--tissue", type=float, default=0.3)
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument("--seed", type=int, default=0, help="another seed gives another slide of the same kind")
    a = ap.parse_args()
    print(make_slide(a.path, a.width, a.height, a.tissue, a.quality, seed=a.seed))


if __name__ == "__main__":
    main()
