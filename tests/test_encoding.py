import numpy as np
import pytest

from slidelake.encoding import decode_tile, encode_tile


@pytest.fixture
def rgb():
    rng = np.random.default_rng(1)
    base = np.linspace(0, 255, 64 * 48, dtype=np.float64).reshape(48, 64)
    img = np.stack([base, base[::-1], np.full_like(base, 128)], -1)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_lossless_round_trip(rgb, fmt):
    out = decode_tile(encode_tile(rgb, fmt), fmt, 64, 48)
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)


def test_webp_lossless_at_quality_100(rgb):
    assert np.array_equal(decode_tile(encode_tile(rgb, "webp", 100), "webp", 64, 48), rgb)


@pytest.mark.parametrize("fmt,q,tol", [("jpeg", 90, 6.0), ("jpeg", 50, 12.0), ("webp", 90, 6.0)])
def test_lossy_round_trip_close(rgb, fmt, q, tol):
    data = encode_tile(rgb, fmt, q)
    out = decode_tile(data, fmt, 64, 48)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(float) - rgb).mean() < tol
    assert len(data) < rgb.nbytes


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown tile encoding"):
        encode_tile(np.zeros((4, 4, 3), np.uint8), "gif")
    with pytest.raises(ValueError, match="uint8"):
        encode_tile(np.zeros((4, 4), np.uint8), "raw")
    with pytest.raises(ValueError, match="expected"):
        decode_tile(b"\x00" * 10, "raw", 4, 4)


def test_tile_stats_equal_the_textbook_definitions():
    """mean / std of the grey level (mean of R, G, B) and the share of pixels whose darkest
    channel is at least the threshold, exactly as NumPy's float64 reductions give them, for
    contiguous tiles, cropped views, flat white and black tiles."""
    from slidelake.decode import tile_stats

    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    big[:40] = 255
    cases = [big, big[10:266, 7:263], np.full((64, 64, 3), 255, np.uint8), np.zeros((32, 48, 3), np.uint8),
             np.dstack([np.full((50, 50), 230, np.uint8), np.full((50, 50), 221, np.uint8),
                        rng.integers(200, 256, (50, 50), dtype=np.uint8)])]
    for rgb in cases:
        grey = rgb.astype(np.float64).mean(axis=2)
        mean, std, bg = tile_stats(rgb, 220)
        assert mean == pytest.approx(grey.mean(), abs=1e-9)
        assert std == pytest.approx(grey.std(), abs=1e-6)
        assert bg == (rgb.min(axis=2) >= 220).mean()
    assert tile_stats(cases[2], 220) == (255.0, 0.0, 1.0) and tile_stats(cases[3], 220) == (0.0, 0.0, 0.0)


def test_quality_reaches_the_codec_and_errors_name_the_sizes():
    """JPEG and WebP follow ``quality`` (a higher quality is closer to the source and larger);
    a raw tile of the wrong size and a decoded tile of another shape are refused with both
    sizes named."""
    rng = np.random.default_rng(0)
    rgb = (np.add.outer(np.arange(64), np.arange(64))[..., None] * [1, 2, 3] % 256).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    for fmt in ("jpeg", "webp"):
        lo, hi = encode_tile(rgb, fmt, 30), encode_tile(rgb, fmt, 95)
        err = [np.abs(decode_tile(b, fmt, 64, 64).astype(int) - rgb).mean() for b in (lo, hi)]
        assert len(hi) > len(lo) and err[1] < err[0], fmt
    assert np.array_equal(decode_tile(encode_tile(rgb, "webp", 100), "webp", 64, 64), rgb)  # lossless at 100
    with pytest.raises(ValueError, match=r"raw tile has 12288 bytes, expected 12300"):
        decode_tile(rgb.tobytes(), "raw", 41, 100)
    with pytest.raises(ValueError, match=r"decoded tile has shape \(64, 64, 3\), expected \(32, 64, 3\)"):
        decode_tile(encode_tile(rgb, "png"), "png", 64, 32)
