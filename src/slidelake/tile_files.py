"""One write task's tile Parquet files in a table's staging folder (the ``delta-rs`` writer's
file sink, :func:`slidelake.write.make_file_sink`)."""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import quote

import numpy as np

from slidelake.config import StorageConfig
from slidelake.direct_io import open_for_write
from slidelake.grid import level0_rects
from slidelake.storage import is_remote, join, open_output


class SlideFiles:
    """One task's tile Parquet files in the staging folder and what it saw per slide.

    Rows arrive sorted by slide, so one file is open at a time:
    ``<staging>/<partition_col>=<value>/part-<uuid>.parquet`` (the partition column is not
    stored in the file, as Spark and Delta do; the ``tile`` bytes compressed with
    ``tile_compression`` and without dictionary or statistics, the other columns zstd level 1;
    around the page cache with ``direct_io``, :func:`slidelake.direct_io.open_for_write`; an
    ``s3://`` staging prefix is written through ``storage``'s S3 client, one upload per file). Per
    slide it keeps the tiles decoded, every failed tile, and each file's rows and level-0
    rectangles; :meth:`results` gives them as :data:`slidelake.write.TILE_FILES_SCHEMA` rows.
    """

    def __init__(self, staging: str, partition_col: str, arrow_schema: Any, tile_compression: str,
                 direct_io: bool, storage: StorageConfig | None = None) -> None:
        self.staging, self.partition_col, self.schema, self.direct_io = staging, partition_col, arrow_schema, direct_io
        self.storage = storage
        self.small = [c for c in arrow_schema.names if c != "tile"]
        self.codecs = {**{c: "zstd" for c in self.small}, "tile": tile_compression}
        self.open: tuple[str, Any, Any] | None = None  # (slide_id, ParquetWriter, file)
        self.stats: dict[str, dict[str, Any]] = {}  # slide_id -> decoded, failures, files [[rel, rows, rects]]

    def slide(self, sid: str) -> dict[str, Any]:
        """The running figures of slide ``sid``."""
        return self.stats.setdefault(sid, {"decoded": 0, "failures": [], "files": []})

    def fail(self, failures: list[tuple[str, dict[str, Any]]]) -> None:
        """Record failed tiles, ``(slide_id, {"tile_x", "tile_y", "stage", "error"})``."""
        for sid, info in failures:
            self.slide(sid)["failures"].append(info)

    def write(self, table: Any, slide_ids: np.ndarray) -> None:
        """Append ``table`` (file columns, rows sorted by slide; ``slide_ids`` the slide of each
        row) to the slides' files."""
        cuts = np.flatnonzero(slide_ids[1:] != slide_ids[:-1]) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(slide_ids)]):
            self._write_slide(str(slide_ids[lo]), table.slice(lo, hi - lo))

    def _write_slide(self, sid: str, table: Any) -> None:
        import pyarrow.parquet as pq

        if self.open is not None and self.open[0] != sid:
            self.close()
        if self.open is None:
            rel = f"{self.partition_col}={quote(sid, safe='')}/part-{uuid.uuid4().hex}.parquet"
            if is_remote(self.staging):
                f = open_output(join(self.staging, rel), self.storage)
            else:
                full = os.path.join(self.staging, rel)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                f = open_for_write(full, self.direct_io)
            try:
                w = pq.ParquetWriter(f, self.schema, compression=self.codecs,
                                     compression_level={c: 1 for c in self.small},
                                     use_dictionary=self.small, write_statistics=self.small)
            except BaseException:
                f.close()
                raise
            self.open = (sid, w, f)
            self.slide(sid)["files"].append([rel, 0, []])
        self.open[1].write_table(table)
        entry = self.stats[sid]["files"][-1]
        entry[1] += table.num_rows
        entry[2].append(level0_rects(table).astype("<i4", copy=False).tobytes())

    def close(self) -> None:
        """Close the open file (its footer: pyarrow does not close a file object it did not open)."""
        if self.open is not None:
            _, w, f = self.open
            self.open = None
            try:
                w.close()
            finally:
                f.close()

    def results(self) -> list[dict[str, Any]]:
        """One :data:`TILE_FILES_SCHEMA` row per (slide, file); a slide with no kept tile gets
        one row with no file. Counts and failures are on the slide's first row."""
        out = []
        for sid, st in self.stats.items():
            for i, (rel, n, rects) in enumerate(st["files"] or [[None, 0, []]]):
                out.append({"slide_id": sid, "file": rel, "rows": n, "decoded": st["decoded"] if i == 0 else 0,
                            "failed": len(st["failures"]) if i == 0 else 0,
                            "failures": st["failures"] if i == 0 else [], "rects": b"".join(rects)})
        return out


__all__ = ["SlideFiles"]
