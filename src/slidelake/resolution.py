"""Resolution: which pyramid level to read, and whether to resize, for a requested tile resolution.

Pure functions (no Spark). :func:`resolve` maps one slide's pyramid plus a
:class:`~slidelake.config.ResolutionConfig` to a :class:`Resolved`, or raises
:class:`ResolutionError` with a message fit for the slide's error column.

Conventions:

* downsample ``d`` is relative to level 0: a tile px covers ``d`` level-0 px per axis;
* mpp at downsample ``d`` is ``mpp0 * d`` (µm/px);
* magnification ``M`` means mpp ``10 / M`` (40x ~ 0.25 µm/px, as TRIDENT and most scanners);
  a slide without mpp but with an objective power ``P`` uses downsample ``P / M`` instead;
* a level is "within tolerance" when ``|D_level / d_target - 1| <= tolerance``
  (relative deviation guard, as wsi-patching); the nearest level is the one with the smallest
  ``|log(D_level / d_target)|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from slidelake.config import ResolutionConfig
from slidelake.rows import Resolution, SlideRow


class ResolutionError(ValueError):
    """A slide cannot give the requested resolution (message says why)."""


@dataclass(frozen=True)
class Resolved:
    """The resolution chosen for one slide.

    Attributes:
        level: pyramid level read (index into OpenSlide's levels).
        level_downsample: that level's downsample relative to level 0.
        downsample: effective downsample of the tiles relative to level 0 (equals
            ``level_downsample`` unless resampling).
        scale: resize factor from the read level to the tiles, ``level_downsample / downsample``
            (1.0 = no resize; < 1 shrinks).
        mpp_x, mpp_y: effective µm/px of the tiles, ``None`` when the slide has no mpp.
        mpp_source: where level-0 mpp came from (``openslide.mpp-x``..., ``assumed``), or None.
        width, height: the slide's extent in tile px (``floor(level0 / downsample)`` when
            resampling, the level's own dimensions otherwise).
    """

    level: int
    level_downsample: float
    downsample: float
    scale: float
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None
    width: int
    height: int

    @property
    def resampled(self) -> bool:
        """True when tiles are resized from the read level."""
        return self.scale != 1.0


def _nearest(downsamples: Sequence[float], target: float) -> int:
    return min(range(len(downsamples)), key=lambda i: (abs(math.log(downsamples[i] / target)), i))


def apply_assumed_mpp(mpp_x: float | None, mpp_y: float | None, mpp_source: str | None,
                      assumed: float | None) -> tuple[float | None, float | None, str | None]:
    """Level-0 ``(mpp_x, mpp_y, mpp_source)`` with ``resolution.assumed_mpp`` (µm/px) filling a
    missing mpp (source ``assumed``); unchanged when the slide has mpp or nothing is assumed."""
    if (mpp_x is None or mpp_y is None) and assumed is not None:
        return float(assumed), float(assumed), "assumed"
    return mpp_x, mpp_y, mpp_source


def with_assumed_mpp(row: SlideRow, assumed: float | None) -> SlideRow:
    """A copy of a ``slides`` row (``mpp_x``, ``mpp_y``, ``mpp_source``) with
    :func:`apply_assumed_mpp` applied."""
    mx, my, src = apply_assumed_mpp(row.get("mpp_x"), row.get("mpp_y"), row.get("mpp_source"), assumed)
    return {**row, "mpp_x": mx, "mpp_y": my, "mpp_source": src}


def target_downsample(
    req: ResolutionConfig,
    mpp_x: float | None,
    objective_power: float | None,
) -> float:
    """Downsample relative to level 0 that the request asks for (``level`` requests excluded).

    Args:
        req: the request (unit ``mpp``, ``downsample`` or ``magnification``).
        mpp_x: level-0 µm/px of the slide (after any assumed mpp), or None.
        objective_power: the slide's objective magnification, or None.

    Raises:
        ResolutionError: mpp/magnification requested for a slide without mpp (and, for
            magnification, without objective power).
    """
    if req.unit == "downsample":
        return float(req.value)
    if req.unit == "mpp":
        if mpp_x is None:
            raise ResolutionError(
                f"slide has no mpp (µm/px) metadata; cannot tile at mpp={req.value}. "
                "Set --assumed-mpp (resolution.assumed_mpp), or request a --level or --downsample"
            )
        return req.value / mpp_x
    if req.unit == "magnification":
        if mpp_x is not None:
            return (10.0 / req.value) / mpp_x
        if objective_power:
            return objective_power / req.value
        raise ResolutionError(
            f"slide has neither mpp nor objective power; cannot tile at {req.value}x. "
            "Set --assumed-mpp (resolution.assumed_mpp), or request a --level or --downsample"
        )
    raise ResolutionError(f"unsupported resolution unit {req.unit!r}")


def resolve(
    req: ResolutionConfig,
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    mpp_x: float | None,
    mpp_y: float | None,
    mpp_source: str | None = None,
    objective_power: float | None = None,
) -> Resolved:
    """Choose the level to read for one slide.

    Args:
        req: the resolution request and fallback policy.
        level_dimensions: ``(width, height)`` of each level in that level's px.
        level_downsamples: each level's downsample relative to level 0 (OpenSlide's values).
        mpp_x, mpp_y: level-0 µm/px from the file, or None when the file has none.
        mpp_source: provenance of mpp (e.g. ``openslide.mpp-x``).
        objective_power: objective magnification from the file, or None.

    Returns:
        The chosen :class:`Resolved`. ``req.assumed_mpp`` fills a missing mpp (source
        ``assumed``).

    Raises:
        ResolutionError: level out of range, missing mpp, or no level acceptable under the
            fallback policy (``error`` beyond tolerance; ``ceil`` above the coarsest level;
            ``floor``/``resample`` finer than level 0, i.e. upsampling).
    """
    if not level_dimensions or len(level_dimensions) != len(level_downsamples):
        raise ResolutionError("slide has no pyramid levels")
    mpp_x, mpp_y, mpp_source = apply_assumed_mpp(mpp_x, mpp_y, mpp_source, req.assumed_mpp)
    if mpp_x is None or mpp_y is None:
        mpp_x = mpp_y = None
        mpp_source = None

    def _at(level: int, downsample: float | None = None) -> Resolved:
        return _resolved_at(level_dimensions, level_downsamples, level, mpp_x, mpp_y, mpp_source, downsample)

    if req.unit == "level":
        lvl = int(req.value)
        if lvl >= len(level_downsamples):
            raise ResolutionError(
                f"level {lvl} requested but slide has {len(level_downsamples)} level(s)"
            )
        return _at(lvl)

    target = target_downsample(req, mpp_x, objective_power)
    ds = [float(d) for d in level_downsamples]
    near = _nearest(ds, target)
    if abs(ds[near] / target - 1.0) <= req.tolerance:
        return _at(near)

    what = f"downsample {target:.4g}" + (f" (mpp {target * mpp_x:.4g})" if mpp_x is not None else "")
    return _at(*_fallback(req, ds, target, near, what))


def _resolved_at(level_dimensions: Sequence[tuple[int, int]], level_downsamples: Sequence[float], level: int,
                 mpp_x: float | None, mpp_y: float | None, mpp_source: str | None,
                 downsample: float | None = None) -> Resolved:
    """The :class:`Resolved` reading ``level``: at its own downsample, or resized to
    ``downsample`` (then the extent is level 0's divided by it, rounded down)."""
    ld = float(level_downsamples[level])
    if downsample is None:
        w, h = level_dimensions[level]
        d = ld
    else:
        d = downsample
        w0, h0 = level_dimensions[0]
        w, h = int(math.floor(w0 / d)), int(math.floor(h0 / d))
    return Resolved(
        level=level, level_downsample=ld, downsample=d, scale=ld / d if downsample is not None else 1.0,
        mpp_x=None if mpp_x is None else mpp_x * d, mpp_y=None if mpp_y is None else mpp_y * d,
        mpp_source=mpp_source, width=int(w), height=int(h),
    )


def _fallback(req: ResolutionConfig, ds: list[float], target: float, near: int, what: str) -> tuple[int, float | None]:
    """``(level, resize downsample or None)`` under ``req.fallback`` when no level of
    downsamples ``ds`` is within tolerance of ``target`` (``near``: the nearest level).

    Raises:
        ResolutionError: the policy finds no acceptable level.
    """
    finer = [i for i in range(len(ds)) if ds[i] <= target]
    coarser = [i for i in range(len(ds)) if ds[i] >= target]
    avail = ", ".join(f"{d:.4g}" for d in ds)
    if req.fallback == "error":
        raise ResolutionError(f"no level within {req.tolerance:.0%} of {what}; level downsamples: {avail} (widen "
                              "--tolerance / resolution.tolerance, or choose --fallback / resolution.fallback)")
    if req.fallback == "nearest":
        return near, None
    if req.fallback == "floor":
        if not finer:
            raise ResolutionError(f"no level at or finer than {what}; level downsamples: {avail}")
        return max(finer, key=lambda i: ds[i]), None
    if req.fallback == "ceil":
        if not coarser:
            raise ResolutionError(f"no level at or coarser than {what}; level downsamples: {avail}")
        return min(coarser, key=lambda i: ds[i]), None
    # resample: nearest finer level, resized to the exact target
    if not finer:
        raise ResolutionError(f"{what} is finer than level 0; resample does not upsample. Level downsamples: {avail}")
    return max(finer, key=lambda i: ds[i]), target


RESOLVED_FIELDS = tuple(Resolution.__annotations__)  # the columns resolve_row adds


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def resolve_row(row: SlideRow, req: ResolutionConfig) -> Resolution:
    """The :data:`RESOLVED_FIELDS` of one ``slides`` row (a dict with ``levels``, ``mpp_x``,
    ``mpp_y``, ``mpp_source``, ``objective_power``), by :func:`resolve`; never raises: a
    :class:`ResolutionError` becomes ``resolution_error`` with the other fields None."""
    out = dict.fromkeys(RESOLVED_FIELDS)
    try:
        levels = list(row["levels"]) if row["levels"] is not None else []
        mx, my, src, obj = row["mpp_x"], row["mpp_y"], row["mpp_source"], row["objective_power"]
        r = resolve(
            req,
            [(int(lv["width"]), int(lv["height"])) for lv in levels],
            [float(lv["downsample"]) for lv in levels],
            None if _missing(mx) else float(mx),
            None if _missing(my) else float(my),
            None if _missing(src) else str(src),
            None if _missing(obj) else float(obj),
        )
        out.update(level=r.level, level_downsample=r.level_downsample, downsample=r.downsample,
                   tile_mpp_x=r.mpp_x, tile_mpp_y=r.mpp_y, tile_mpp_source=r.mpp_source,
                   extent_x=r.width, extent_y=r.height)
    except ResolutionError as exc:
        out["resolution_error"] = str(exc)
    return out
