import math

import pytest

from slidelake.config import ResolutionConfig
from slidelake.resolution import ResolutionError, resolve

# an NDPI-like pyramid: 40x, 0.228 µm/px, downsamples 1..64
DIMS = [(3968 // 2**k, 4864 // 2**k) for k in range(7)]
DOWNS = [float(2**k) for k in range(7)]
MPP = 0.2281750559028887


def R(**kw):
    return ResolutionConfig(**kw)


def test_level_request():
    r = resolve(R(level=2), DIMS, DOWNS, MPP, MPP)
    assert (r.level, r.downsample, r.scale) == (2, 4.0, 1.0)
    assert r.mpp_x == pytest.approx(MPP * 4)
    assert (r.width, r.height) == DIMS[2]
    with pytest.raises(ResolutionError, match="level 7 requested"):
        resolve(R(level=7), DIMS, DOWNS, MPP, MPP)


def test_mpp_within_tolerance_picks_matching_level():
    r = resolve(R(mpp=0.9127, fallback="error", tolerance=0.01), DIMS, DOWNS, MPP, MPP)
    assert r.level == 2 and not r.resampled


@pytest.mark.parametrize("fallback,level", [("nearest", 1), ("floor", 1), ("ceil", 2)])
def test_fallbacks_between_levels(fallback, level):
    # 0.6 µm/px -> downsample 2.63: between level 1 (2) and level 2 (4); nearest by log ratio is 1
    r = resolve(R(mpp=0.6, fallback=fallback), DIMS, DOWNS, MPP, MPP)
    assert r.level == level
    assert r.mpp_x == pytest.approx(MPP * DOWNS[level])


def test_error_fallback_reports_levels():
    with pytest.raises(ResolutionError, match="no level within 5%"):
        resolve(R(mpp=0.6, fallback="error"), DIMS, DOWNS, MPP, MPP)


def test_resample_reads_finer_level_and_hits_exact_mpp():
    r = resolve(R(mpp=0.6, fallback="resample"), DIMS, DOWNS, MPP, MPP)
    assert r.level == 1 and r.resampled
    assert r.mpp_x == pytest.approx(0.6)
    assert r.downsample == pytest.approx(0.6 / MPP)
    assert r.scale == pytest.approx(2.0 / (0.6 / MPP))
    assert r.width == math.floor(3968 / (0.6 / MPP))


def test_upsampling_and_beyond_pyramid_are_errors():
    with pytest.raises(ResolutionError, match="finer than level 0"):
        resolve(R(mpp=0.1, fallback="resample"), DIMS, DOWNS, MPP, MPP)
    with pytest.raises(ResolutionError, match="at or finer"):
        resolve(R(mpp=0.1, fallback="floor"), DIMS, DOWNS, MPP, MPP)
    with pytest.raises(ResolutionError, match="at or coarser"):
        resolve(R(mpp=100.0, fallback="ceil"), DIMS, DOWNS, MPP, MPP)
    # nearest never fails: coarsest level
    assert resolve(R(mpp=100.0, fallback="nearest"), DIMS, DOWNS, MPP, MPP).level == 6


def test_missing_mpp_is_an_error_unless_assumed():
    with pytest.raises(ResolutionError, match="no mpp"):
        resolve(R(mpp=0.5), DIMS, DOWNS, None, None)
    r = resolve(R(mpp=0.5, assumed_mpp=0.25), DIMS, DOWNS, None, None)
    assert r.mpp_source == "assumed" and r.level == 1 and r.mpp_x == pytest.approx(0.5)
    # level and downsample requests work without mpp; effective mpp stays unknown
    r = resolve(R(downsample=4), DIMS, DOWNS, None, None)
    assert r.level == 2 and r.mpp_x is None


def test_magnification():
    # 10x -> 1.0 µm/px -> downsample 4.38 from 0.228: level 2 (4) is nearest
    assert resolve(R(magnification=10), DIMS, DOWNS, MPP, MPP).level == 2
    # without mpp, objective power 40 gives downsample 4 exactly
    assert resolve(R(magnification=10, fallback="error"), DIMS, DOWNS, None, None, objective_power=40).level == 2
    with pytest.raises(ResolutionError, match="neither mpp nor objective"):
        resolve(R(magnification=10), DIMS, DOWNS, None, None)


def test_non_integer_downsamples_within_tolerance():
    dims = [(4443, 3567), (2221, 1783)]
    downs = [1.0, 2.0005055500659967]
    r = resolve(R(downsample=2.0, fallback="error", tolerance=0.01), dims, downs, None, None)
    assert r.level == 1 and r.downsample == pytest.approx(2.0005055500659967) and not r.resampled


def test_magnification_and_missing_metadata():
    """``magnification`` is ``10 / magnification`` µm/px (20x on a 0.25 µm/px scan: downsample
    2), or the objective power's ratio without mpp; with neither, an error naming the fix."""
    from slidelake.resolution import target_downsample

    assert target_downsample(ResolutionConfig(magnification=20), 0.25, None) == pytest.approx(2.0)
    assert target_downsample(ResolutionConfig(magnification=10), None, 40.0) == pytest.approx(4.0)
    assert target_downsample(ResolutionConfig(downsample=3.5), None, None) == 3.5
    with pytest.raises(ResolutionError, match=r"neither mpp nor objective power; cannot tile at 20.0x\. Set "
                                              r"--assumed-mpp \(resolution.assumed_mpp\), or request a --level or "
                                              r"--downsample$"):
        target_downsample(ResolutionConfig(magnification=20), None, None)
    with pytest.raises(ResolutionError, match=r"no mpp .* cannot tile at mpp=0.5\. Set --assumed-mpp "):
        target_downsample(ResolutionConfig(mpp=0.5), None, 40.0)


def test_anisotropic_pixels_resampling_and_assumed_mpp_by_hand():
    """Values worked out by hand: each axis keeps its own mpp; a resampled extent is level 0's
    divided by the downsample, rounded down; an assumed mpp fills a slide missing either axis."""
    from slidelake.resolution import apply_assumed_mpp

    dims, ds = [(1001, 801), (500, 400)], [1.0, 2.002]
    r = resolve(ResolutionConfig(mpp=0.5), dims, ds, 0.25, 0.3, "openslide.mpp-x")
    assert (r.level, r.level_downsample, r.downsample, r.scale, r.width, r.height) == (1, 2.002, 2.002, 1.0, 500, 400)
    assert r.mpp_x == pytest.approx(0.5005) and r.mpp_y == pytest.approx(0.6006) and r.mpp_source == "openslide.mpp-x"
    r = resolve(ResolutionConfig(mpp=0.75, fallback="resample"), dims, ds, 0.25, 0.3)
    assert (r.level, r.level_downsample, r.downsample, r.width, r.height) == (1, 2.002, 3.0, 333, 267)
    assert r.scale == pytest.approx(2.002 / 3) and r.mpp_y == pytest.approx(0.9) and r.resampled
    assert apply_assumed_mpp(0.25, None, "tiff.XResolution", 0.5) == (0.5, 0.5, "assumed")
    assert apply_assumed_mpp(None, 0.25, None, 0.5) == (0.5, 0.5, "assumed")
    assert apply_assumed_mpp(0.25, 0.3, "aperio.MPP", 0.5) == (0.25, 0.3, "aperio.MPP")
    assert apply_assumed_mpp(None, None, None, None) == (None, None, None)
    r = resolve(ResolutionConfig(level=0), dims, ds, 0.25, None, "openslide.mpp-x")  # half an mpp is none
    assert (r.mpp_x, r.mpp_y, r.mpp_source) == (None, None, None)
    r = resolve(ResolutionConfig(level=0, assumed_mpp=0.5), dims, ds, 0.25, None)
    assert (r.mpp_x, r.mpp_y, r.mpp_source) == (0.5, 0.5, "assumed")


def test_tolerance_is_inclusive_and_errors_name_the_levels():
    dims, ds = [(4000, 3000), (1600, 1200)], [1.0, 2.5]
    # asked downsample 2 (0.5 / 0.25), the level is 25 % off: inside a tolerance of exactly 0.25
    assert resolve(ResolutionConfig(mpp=0.5, tolerance=0.25, fallback="error"), dims, ds, 0.25, 0.25).level == 1
    with pytest.raises(ResolutionError, match=r"^no level within 24% of downsample 2 \(mpp 0\.5\); "
                                              r"level downsamples: 1, 2\.5 \(widen --tolerance / resolution\."
                                              r"tolerance, or choose --fallback / resolution\.fallback\)$"):
        resolve(ResolutionConfig(mpp=0.5, tolerance=0.24, fallback="error"), dims, ds, 0.25, 0.25)
    with pytest.raises(ResolutionError, match=r"^no level within 5% of downsample 2; level downsamples: 1, 2\.5 "):
        resolve(ResolutionConfig(downsample=2, fallback="error"), dims, ds, None, None)
    with pytest.raises(ResolutionError, match=r"^slide has no pyramid levels$"):
        resolve(ResolutionConfig(level=0), [], [], 0.25, 0.25)
    with pytest.raises(ResolutionError, match=r"^slide has no pyramid levels$"):
        resolve(ResolutionConfig(level=0), dims, [1.0], 0.25, 0.25)
    with pytest.raises(ResolutionError, match=r"^level 2 requested but slide has 2 level\(s\)$"):
        resolve(ResolutionConfig(level=2), dims, ds, 0.25, 0.25)
    with pytest.raises(ResolutionError, match=r"^downsample 0\.5 \(mpp 0\.125\) is finer than level 0; resample "
                                              r"does not upsample\. Level downsamples: 1, 2\.5$"):
        resolve(ResolutionConfig(mpp=0.125, fallback="resample"), dims, ds, 0.25, 0.25)
