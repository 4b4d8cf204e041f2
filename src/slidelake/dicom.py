"""DICOM whole-slide images: a slide is a *series* of files, one slide in the tables.

A DICOM WSI (DICOM PS3.3 A.32.8, VL Whole Slide Microscopy Image) stores each pyramid level
as an instance with ``ImageType`` value 3 ``VOLUME``, and the label, overview and thumbnail
images as instances of type ``LABEL``, ``OVERVIEW`` and ``THUMBNAIL``; all share the series'
``SeriesInstanceUID`` and usually one folder. OpenSlide opens the whole series from any one of
its files. slidelake lists one path per series (its level-0 ``VOLUME`` file), fingerprints the
series' ``VOLUME`` files together, and never reads the label or overview images (they can show
the patient's name).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

ASSOCIATED = ("LABEL", "OVERVIEW", "THUMBNAIL")  # ImageType value 3 of the non-level images


class Header(NamedTuple):
    """What grouping needs of one DICOM file: its series, ``ImageType`` value 3 (``VOLUME``,
    ``LABEL``, ...) and the level's width in px (``TotalPixelMatrixColumns``, 0 if absent)."""

    series: str
    kind: str
    columns: int


def is_dicom(path: str) -> bool:
    """True for a ``.dcm`` file name (case-insensitive)."""
    return path.lower().endswith(".dcm")


def header(path: str) -> Header | None:
    """The :class:`Header` of a DICOM file from its first tags (pydicom, pixel data not read),
    or None when it is not a readable DICOM file with a series."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns"])
    except Exception:  # noqa: BLE001 - not DICOM, truncated: probed later, becomes an error row
        return None
    series = str(ds.get("SeriesInstanceUID", "") or "")
    image_type = list(ds.get("ImageType", []) or [])
    kind = str(image_type[2]).upper() if len(image_type) > 2 else "VOLUME"
    return Header(series, kind, int(ds.get("TotalPixelMatrixColumns", 0) or 0)) if series else None


def series_files(path: str, read: Callable[[str], Header | None] = header) -> list[str]:
    """The ``VOLUME`` files of ``path``'s series in its folder, sorted by path (``[path]`` when
    its header cannot be read). ``read`` reads a header (a caching one when called for many
    files of a folder)."""
    own = read(path)
    if own is None:
        return [path]
    folder = os.path.dirname(path) or "."
    members = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if is_dicom(n)]
    return [p for p in members if (h := read(p)) is not None and h.series == own.series
            and h.kind not in ASSOCIATED] or [path]


def collapse_series(paths: list[str]) -> dict[str, str | None]:
    """For each of ``paths``: the path standing for its slide. A DICOM file maps to its series'
    level-0 ``VOLUME`` file (the widest; ties: the first by path), a label, overview or
    thumbnail image to None (never a slide), any other file to itself. Each file's header is
    read once."""
    cache: dict[str, Header | None] = {}

    def read(p: str) -> Header | None:
        if p not in cache:
            cache[p] = header(p)
        return cache[p]

    chosen: dict[tuple[str, str], str] = {}
    out: dict[str, str | None] = {}
    for p in paths:
        h = read(p) if is_dicom(p) else None
        if h is None:
            out[p] = p
        elif h.kind in ASSOCIATED:
            out[p] = None
        else:
            key = (os.path.dirname(p), h.series)
            if key not in chosen:
                members = series_files(p, read)
                chosen[key] = min(members, key=lambda m: (-((read(m) or h).columns), m))
            out[p] = chosen[key]
    return out


__all__ = ["ASSOCIATED", "Header", "is_dicom", "header", "series_files", "collapse_series"]
