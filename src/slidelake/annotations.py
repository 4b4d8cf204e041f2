"""Annotations: QuPath GeoJSON polygons (level-0 px) per class, and the label rule.

A slide's annotations come from a manifest column (``annotations.column``) or a sidecar
``<slide><annotations.sidecar_suffix>``; :class:`AnnotationIndex` gives each tile the fraction
of its area covered by each class, and :func:`label_rule` its ``label``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
import shapely.geometry

from slidelake.config import StorageConfig
from slidelake.storage import exists, join, read_bytes


def load_annotations(path: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Read a GeoJSON annotation file (QuPath export layout; a file or an ``s3://`` object
    reached with ``storage``) into per-class geometries.

    Accepts a FeatureCollection, a list of features or a single feature. A feature's class is
    ``properties.classification.name`` (QuPath >= 0.2), ``properties.classification`` when a
    string, else ``"Unclassified"``. Polygon and MultiPolygon geometries (level-0 px) are kept;
    points and lines are ignored; invalid polygons are repaired (``make_valid``).

    Returns:
        ``{class_name: shapely geometry}`` (union of that class's polygons), sorted by name.

    Raises:
        ValueError: not JSON, or not GeoJSON features.
    """
    data = json.loads(read_bytes(path, storage).decode("utf-8"))
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection or list of features")
    by_class: dict[str, list[Any]] = {}
    for f in feats:
        if not isinstance(f, dict) or not f.get("geometry"):
            continue
        geom = shapely.geometry.shape(f["geometry"])
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        props = f.get("properties") or {}
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else cls
        name = str(name) if name else "Unclassified"
        by_class.setdefault(name, []).append(shapely.make_valid(geom))
    return {k: shapely.union_all(v) for k, v in sorted(by_class.items())}


class AnnotationIndex:
    """Annotation polygons of one slide in an STRtree, for per-tile class fractions.

    Args:
        classes: ``{class_name: geometry}`` in level-0 px (:func:`load_annotations`).
    """

    def __init__(self, classes: dict[str, Any]) -> None:
        self.names = list(classes)
        parts, owner = [], []
        for k, geom in enumerate(classes.values()):
            for p in shapely.get_parts(geom):
                if p.geom_type == "Polygon" and p.area > 0:
                    parts.append(p)
                    owner.append(k)
        self.parts = np.array(parts, dtype=object)
        self.owner = np.array(owner, dtype=np.int64)
        self.tree = shapely.STRtree(self.parts)
        union = shapely.union_all(list(classes.values())) if classes else shapely.Polygon()
        self.union_parts = np.array([p for p in shapely.get_parts(union) if p.area > 0], dtype=object)
        self.union_tree = shapely.STRtree(self.union_parts)

    def fractions(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For tile geometries (level-0 px): ``(class_fractions (n, classes), annotated (n,))``,
        each the covered area divided by the tile geometry's area."""
        n = len(geoms)
        area = shapely.area(geoms)
        safe = np.where(area > 0, area, 1.0)
        per_class = np.zeros((n, len(self.names)))
        annotated = np.zeros(n)
        if len(self.parts):
            ti, pi = self.tree.query(geoms, predicate="intersects")
            a = shapely.area(shapely.intersection(geoms[ti], self.parts[pi]))
            np.add.at(per_class, (ti, self.owner[pi]), a)
        if len(self.union_parts):
            ti, pi = self.union_tree.query(geoms, predicate="intersects")
            np.add.at(annotated, ti, shapely.area(shapely.intersection(geoms[ti], self.union_parts[pi])))
        return per_class / safe[:, None], np.minimum(annotated / safe, 1.0)


def label_rule(names: list[str], fractions: np.ndarray, min_fraction: float) -> pa.StringArray:
    """Per tile, the class with the largest fraction when it is >= ``min_fraction`` (ties: the
    first name in sorted order), else null.

    Args:
        names: class names, in the order of ``fractions``' columns.
        fractions: float ``(n, len(names))``.
    """
    n = len(fractions)
    if not names or n == 0:
        return pa.nulls(n, pa.string())
    best = fractions.argmax(axis=1)
    top = fractions[np.arange(n), best]
    chosen = pa.array(names, pa.string()).take(pa.array(best))
    return pc.if_else(pa.array((top >= min_fraction) & (top > 0)), chosen, pa.scalar(None, pa.string()))


def annotation_path(path: str, attributes: dict[str, str] | None, column: str, suffix: str,
                    storage: StorageConfig | None = None) -> str | None:
    """A slide's annotation file: the manifest column ``column`` (relative to the slide's
    folder when relative), else the sidecar ``<slide path without extension><suffix>`` when it
    exists (an object beside an ``s3://`` slide, reached with ``storage``), else None."""
    given = (attributes or {}).get(column)
    if given:
        return given if os.path.isabs(given) or "://" in given else join(path.rsplit("/", 1)[0], given)
    side = os.path.splitext(path)[0] + suffix
    return side if exists(side, storage) else None


__all__ = ["load_annotations", "AnnotationIndex", "label_rule", "annotation_path"]
