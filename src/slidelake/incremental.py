"""What tiling runs committed, and so what an incremental run skips.

* ``run_slides``: one row per slide of each committed tiles batch (which slide content, with
  which tiling config, in which tiles table and version). A slide whose content (``slide_id``)
  is already tiled with this config in this tiles table is skipped (:func:`tiled_before`).
* ``tile_errors``: every tile that failed in a run, with its coordinates and error.
* A tiles table holds one tiling config: :func:`check_config_mix` refuses another one.
"""

from __future__ import annotations

from slidelake.lake import Lake
from slidelake.lineage import RUN_SLIDES_SCHEMA, TILE_ERRORS_SCHEMA, RunRecord, utcnow
from slidelake.rows import ResolvedSlide, SlideCount, TileFailure

# failed tiles listed per slide in runs.slide_errors (tile_errors lists them all)
MAX_ERROR_SAMPLES = 20


class ConfigMismatchError(RuntimeError):
    """The tiles table holds tiles of other slides made with a different tiling config."""


def tiled_before(lake: Lake, config_hash: str) -> set[str]:
    """``slide_id`` of slides whose tiles with tiling config ``config_hash`` are committed in
    the lake's tiles table by their latest commit, from ``run_slides`` (rows since the table
    was last replaced whole; none when the tiles table does not exist)."""
    if not lake.exists("tiles"):
        return set()
    rows = [r for r in lake.read_rows("run_slides", RUN_SLIDES_SCHEMA) if r["tiles_table"] == lake.tiles_table]
    replaced = max((r["run_id"] for r in rows if r["replaced_table"]), default="")
    latest: dict[str, dict] = {}  # the last commit of each slide decides (a later config may have replaced it)
    for r in sorted(rows, key=lambda r: r["run_id"]):
        if r["run_id"] >= replaced:
            latest[r["slide_id"]] = r
    return {sid for sid, r in latest.items() if r["config_hash"] == config_hash}


def check_config_mix(lake: Lake, config_hash: str, slide_ids: list[str]) -> None:
    """Refuse to add tiles of ``config_hash`` to a tiles table holding other slides' tiles of
    another config.

    Raises:
        ConfigMismatchError: tiles of slides not in ``slide_ids`` carry another config hash.
    """
    t = lake.read_columns("tiles", ["slide_id", "config_hash"])
    if t.num_columns == 0 or t.num_rows == 0:
        return
    pdf = t.to_pandas()
    others = sorted(set(pdf.loc[(pdf["config_hash"] != config_hash) & ~pdf["slide_id"].isin(list(slide_ids)),
                                "config_hash"].dropna()))[:5]
    if others:
        raise ConfigMismatchError(
            f"the tiles table {lake.path('tiles')} holds tiles of other slides made with a different "
            f"tiling config (config_hash {', '.join(others)}; this run: {config_hash}). Write to another table "
            "(--tiles-table NAME / tables.tiles_table) or replace the whole table (--replace-table)"
        )


def write_tile_errors(lake: Lake, rec: RunRecord, slides: list[ResolvedSlide], failures: dict[str, list[TileFailure]]) -> None:
    """Append every failed tile of ``slides`` (resolved rows) to ``tile_errors`` in one commit
    (the table is created empty on the first run so that it can always be queried)."""
    by_id = {r["slide_id"]: r for r in slides}
    now = utcnow()
    rows = [
        {"run_id": rec.run_id, "slide_id": sid, "path": by_id[sid]["path"], "config_hash": rec.config_hash,
         "level": by_id[sid]["level"], "tile_x": f["tile_x"], "tile_y": f["tile_y"], "stage": f.get("stage", "decode"),
         "error": f["error"], "created_at": now}
        for sid, fails in failures.items() if sid in by_id for f in fails
    ]
    if rows or not lake.exists("tile_errors"):
        res = lake.write_rows("tile_errors", rows, TILE_ERRORS_SCHEMA, mode="append")
        rec.table_versions["tile_errors"] = res.version if res.version is not None else -1


def write_run_slides(lake: Lake, rec: RunRecord, batch: list[ResolvedSlide], counts: list[SlideCount], version: int,
                     replaced_table: bool) -> None:
    """Append one ``run_slides`` row per slide of a committed batch (after its tiles commit,
    tiles table version ``version``)."""
    now = utcnow()
    by_id = {c["slide_id"]: c for c in counts}
    rows = [{"run_id": rec.run_id, "slide_id": r["slide_id"], "path": r["path"], "fingerprint": r["fingerprint"],
             "config_hash": rec.config_hash, "tiles_table": lake.tiles_table, "tiles_version": version,
             "replaced_table": replaced_table, "tiles_generated": by_id[r["slide_id"]]["tiles_generated"],
             "tiles_written": by_id[r["slide_id"]]["tiles_written"], "tiles_failed": by_id[r["slide_id"]]["tiles_failed"],
             "created_at": now} for r in batch]
    if rows or replaced_table:
        lake.write_rows("run_slides", rows, RUN_SLIDES_SCHEMA, mode="append")


def slide_counts(rec: RunRecord, batch: list[ResolvedSlide], generated: dict[str, int], written: dict[str, int],
                 decoded: dict[str, int], failed: dict[str, int], failures: dict[str, list[TileFailure]]) -> list[SlideCount]:
    """Per-slide counts of a committed batch (``runs.slide_counts``); up to
    :data:`MAX_ERROR_SAMPLES` failed tiles per slide go to ``rec.slide_errors``."""
    counts: list[SlideCount] = []
    for r in batch:
        sid = r["slide_id"]
        gen, wrote = generated[sid], written.get(sid, 0)
        dec = min(max(decoded.get(sid, 0), wrote), gen)
        n_failed = min(failed.get(sid, 0), gen - wrote)
        # tiles whose overlap failed were neither skipped by the mask nor decoded
        no_overlap = min(sum(1 for f in failures.get(sid, []) if f.get("stage") == "overlap"), gen - dec)
        counts.append({
            "slide_id": sid, "path": r["path"], "level": r["level"], "mpp_x": r["tile_mpp_x"],
            "tiles_generated": gen, "tiles_skipped": gen - dec - no_overlap, "tiles_decoded": dec,
            "tiles_failed": n_failed, "tiles_filtered": max(0, dec - wrote - (n_failed - no_overlap)),
            "tiles_written": wrote,
        })
        for s in failures.get(sid, [])[:MAX_ERROR_SAMPLES]:
            rec.slide_error(r, s.get("stage", "decode"), f"tile ({s['tile_x']}, {s['tile_y']}): {s['error']}")
    return counts


__all__ = ["ConfigMismatchError", "tiled_before", "check_config_mix", "write_tile_errors", "write_run_slides",
           "slide_counts", "MAX_ERROR_SAMPLES"]
