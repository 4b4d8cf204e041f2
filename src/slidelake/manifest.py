"""What a manifest says about its slides: the table read (:func:`read_manifest`), and the
columns that become typed columns of ``slides`` and ``tiles`` (``slide_label``, ``patient_id``,
``split``) with patient-level splits (:func:`with_manifest_fields`)."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import pandas as pd

from slidelake.rows import SlideRow

if TYPE_CHECKING:
    from slidelake.config import PipelineConfig


def read_manifest(path: str) -> pd.DataFrame:
    """A manifest (``.csv``, every cell a string, or ``.parquet``) with its ``path`` column made
    absolute (relative paths are relative to the manifest's folder).

    Raises:
        ValueError: the manifest has no ``path`` column.
    """
    if path.lower().endswith(".parquet"):
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "path" not in df.columns:
        raise ValueError(f"manifest {path} has no 'path' column (columns: {list(df.columns)})")
    base = os.path.dirname(os.path.abspath(path))
    df = df.copy()
    df["path"] = [p if os.path.isabs(p) or "://" in p else os.path.normpath(os.path.join(base, p))
                  for p in df["path"].astype(str)]
    return df


class ManifestError(ValueError):
    """A manifest contradicts itself (e.g. one patient's slides in two splits)."""


def assign_split(patient: str, fractions: dict[str, float], seed: int) -> str:
    """The split of ``patient`` under ``splits`` (:class:`slidelake.config.SplitConfig`): ``u`` =
    the first 8 bytes of SHA-256 of ``"<seed>:<patient>"`` over 2**64, in ``[0, 1)``; the first
    split, in ``fractions``' order, whose cumulative share exceeds ``u`` (the last one if
    rounding leaves ``u`` above every sum)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{patient}".encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for name, share in fractions.items():
        total += share
        if u < total:
            return name
    return name


def patient_splits(attributes: list[dict[str, str | None]], cfg: PipelineConfig) -> dict[str, str]:
    """``{patient_id: split}`` given by the manifest rows' ``attributes`` (the listing's, before
    any file is read); an empty manifest cell is no value.

    Raises:
        ManifestError: one patient's manifest rows give two different splits.
    """
    disc, given = cfg.discovery, {}
    for attrs in attributes:
        patient, split = (attrs or {}).get(disc.patient_column) or None, (attrs or {}).get(disc.split_column) or None
        if split is not None and patient is not None and given.setdefault(patient, split) != split:
            raise ManifestError(f"patient {patient} is in splits {given[patient]!r} and {split!r} in the manifest "
                                f"(column {disc.split_column!r}): a patient's slides must share one split")
    return given


def with_manifest_fields(rows: list[SlideRow], given: dict[str, str], cfg: PipelineConfig) -> list[SlideRow]:
    """``rows`` with the manifest's ``discovery.label_column``, ``patient_column`` and
    ``split_column`` moved from ``attributes`` to ``slide_label``, ``patient_id`` and ``split``.
    A slide without a split takes its patient's split in ``given`` (:func:`patient_splits`),
    else :func:`assign_split` of its patient (``patient_id``, else ``slide_id``) when
    ``splits.fractions`` is set, else none."""
    disc, splits = cfg.discovery, cfg.splits
    out = []
    for r in rows:
        attrs = dict(r.get("attributes") or {})
        label, patient = attrs.pop(disc.label_column, None) or None, attrs.pop(disc.patient_column, None) or None
        split = attrs.pop(disc.split_column, None) or given.get(patient)
        owner = patient or r["slide_id"]
        if split is None and owner is not None and splits.fractions:
            split = assign_split(owner, splits.fractions, splits.seed)
        out.append({**r, "attributes": attrs, "slide_label": label, "patient_id": patient, "split": split})
    return out


__all__ = ["read_manifest", "ManifestError", "assign_split", "patient_splits", "with_manifest_fields"]
