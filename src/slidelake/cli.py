"""Command line: ``slidelake discover | masks | tile | run | sql``.

Settings come from a YAML file (``--config conf/<name>.yaml``) and are overridden by flags.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-slide images to Delta tables of tiles (slides, tiles, runs).")
console = Console()

_ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (see conf/).")
_LakeOpt = typer.Option(None, "--lake", help="Lake root folder holding the Delta tables.")


def _overrides(inputs: list[str] | None, lake: str | None, **flags: Any) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if inputs:
        o["inputs"] = list(inputs)
    if lake:
        o["lake"] = lake
    sections = {
        "resolution": ("level", "mpp", "downsample", "magnification", "fallback", "tolerance", "assumed_mpp"),
        "grid": ("tile_extent", "stride", "last", "roi", "tile_roi"),
        "decode": ("encoding", "quality", "batch_size"),
        "filter": ("min_std", "max_background_fraction", "min_tissue_fraction", "min_annotated_fraction"),
        "tables": ("writer", "tiles_table"),
    }
    for section, keys in sections.items():
        for k in keys:
            v = flags.get(k)
            if v is not None:
                o.setdefault(section, {})[k] = v
    if flags.get("mask_mpp") is not None:
        o.setdefault("masks", {})["mpp"] = flags["mask_mpp"]
    if flags.get("masks") is not None:
        o.setdefault("masks", {})["enabled"] = flags["masks"]
    return o


def _load(config: Optional[str], overrides: dict[str, Any]):
    from slidelake.config import load_config

    try:
        return load_config(config, overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _report(rec, lake) -> None:
    from slidelake.pipeline import summary

    console.print(summary(rec), markup=False, highlight=False)
    if rec.profile:
        table = Table("profile", "value")
        for k, v in sorted(rec.profile.items()):
            table.add_row(k, f"{v:,.2f}")
        console.print(table)
    shown = {"discover": ("slides", "runs"), "masks": ("masks", "runs")}.get(rec.job, ("slides", "masks", "tiles", "tile_errors", "runs"))
    for name in shown:
        if lake.exists(name):  # e.g. a run without masks made no masks table
            console.print(f"  {name:11s} {lake.path(name)}", markup=False, highlight=False)


def _xy(v: Optional[str]) -> Optional[list[int]]:
    if v is None:
        return None
    parts = [int(p) for p in v.replace("x", ",").split(",") if p]
    return parts * 2 if len(parts) == 1 else parts


def _roi(v: Optional[str]) -> Optional[list[int]]:
    return None if v is None else [int(p) for p in v.split(",")]


def _run_job(job: str, inputs, config, lake, replace_table: bool, progress: Optional[bool] = None,
             profile: bool = False, force: bool = False, **flags) -> None:
    from slidelake.pipeline import ConfigMismatchError, run_all, run_discover, run_masks, run_tile
    from slidelake.spark import get_spark

    for key in ("tile_extent", "stride"):
        flags[key] = _xy(flags.get(key))
    flags["roi"] = _roi(flags.get("roi"))
    cfg = _load(config, _overrides(inputs, lake, **flags))
    if job in ("discover", "run") and not cfg.inputs:
        console.print("[red]no inputs:[/red] give slide files/folders/manifests or 'inputs' in the config")
        raise typer.Exit(2)
    spark = get_spark()
    try:
        if job == "discover":
            rec = run_discover(spark, cfg)
        elif job == "masks":
            rec = run_masks(spark, cfg)
        else:
            show = sys.stderr.isatty() if progress is None else progress
            job_fn = run_tile if job == "tile" else run_all
            rec = job_fn(spark, cfg, replace_table=replace_table, progress=show, profile=profile, force=force)
    except ConfigMismatchError as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(3) from exc
    from slidelake.lake import Lake

    _report(rec, Lake.open(spark, cfg))


TILE_FLAGS = dict(
    level=typer.Option(None, help="Pyramid level to tile (0 = full resolution)."),
    mpp=typer.Option(None, help="Tile resolution in µm/px."),
    downsample=typer.Option(None, help="Tile resolution as downsample from level 0."),
    magnification=typer.Option(None, help="Tile resolution as magnification (10/mag µm/px)."),
    fallback=typer.Option(None, help="error | nearest | floor | ceil | resample."),
    tolerance=typer.Option(None, help="Relative downsample deviation accepted as a match."),
    assumed_mpp=typer.Option(None, "--assumed-mpp", help="Level-0 µm/px for slides without mpp."),
    tile_extent=typer.Option(None, "--tile-extent", help="Tile size in px, '256' or '256,512'."),
    stride=typer.Option(None, help="Stride in px, '224' or 'x,y' (overlap = extent - stride)."),
    last=typer.Option(None, help="Edge policy: keep | drop | shift."),
    roi=typer.Option(None, help="Rectangle 'x,y,w,h' in level-0 px."),
    encoding=typer.Option(None, help="raw | png | jpeg | webp."),
    quality=typer.Option(None, help="JPEG/WebP quality 1-100."),
    batch_size=typer.Option(None, "--batch-size", help="Tiles per decode batch (worker memory)."),
    min_std=typer.Option(None, "--min-std", help="Keep tiles with grey std >= this."),
    max_background_fraction=typer.Option(None, "--max-background", help="Keep tiles with background fraction <= this."),
    min_tissue_fraction=typer.Option(None, "--min-tissue", help="Keep tiles whose tissue fraction >= this (before decode)."),
    min_annotated_fraction=typer.Option(None, "--min-annotated", help="Keep tiles whose annotated fraction >= this (before decode)."),
    tile_roi=typer.Option(None, "--tile-roi", help="WKT polygon in tile px: fractions are computed inside it."),
    masks=typer.Option(None, "--masks/--no-masks", help="Compute tissue masks and filter on them (default: on)."),
    mask_mpp=typer.Option(None, "--mask-mpp", help="Mask resolution in µm/px (default 8)."),
    writer=typer.Option(None, help="Delta writer: auto | spark | delta-rs."),
    tiles_table=typer.Option(None, "--tiles-table", help="Tile table name under the lake."),
)


@app.command()
def discover(
    inputs: Optional[list[str]] = typer.Argument(None, help="Slide files, folders, globs or manifests."),
    config: Optional[str] = _ConfigOpt,
    lake: Optional[str] = _LakeOpt,
    assumed_mpp: Optional[float] = TILE_FLAGS["assumed_mpp"],
    writer: Optional[str] = TILE_FLAGS["writer"],
) -> None:
    """Find slides and write one row per file to <lake>/slides."""
    _run_job("discover", inputs, config, lake, False, assumed_mpp=assumed_mpp, writer=writer)


def _tiling_command(job: str):
    def command(
        inputs: Optional[list[str]] = typer.Argument(None, help="Slide files, folders, globs or manifests."),
        config: Optional[str] = _ConfigOpt,
        lake: Optional[str] = _LakeOpt,
        level: Optional[int] = TILE_FLAGS["level"],
        mpp: Optional[float] = TILE_FLAGS["mpp"],
        downsample: Optional[float] = TILE_FLAGS["downsample"],
        magnification: Optional[float] = TILE_FLAGS["magnification"],
        fallback: Optional[str] = TILE_FLAGS["fallback"],
        tolerance: Optional[float] = TILE_FLAGS["tolerance"],
        assumed_mpp: Optional[float] = TILE_FLAGS["assumed_mpp"],
        tile_extent: Optional[str] = TILE_FLAGS["tile_extent"],
        stride: Optional[str] = TILE_FLAGS["stride"],
        last: Optional[str] = TILE_FLAGS["last"],
        roi: Optional[str] = TILE_FLAGS["roi"],
        encoding: Optional[str] = TILE_FLAGS["encoding"],
        quality: Optional[int] = TILE_FLAGS["quality"],
        batch_size: Optional[int] = TILE_FLAGS["batch_size"],
        min_std: Optional[float] = TILE_FLAGS["min_std"],
        max_background_fraction: Optional[float] = TILE_FLAGS["max_background_fraction"],
        min_tissue_fraction: Optional[float] = TILE_FLAGS["min_tissue_fraction"],
        min_annotated_fraction: Optional[float] = TILE_FLAGS["min_annotated_fraction"],
        tile_roi: Optional[str] = TILE_FLAGS["tile_roi"],
        masks: Optional[bool] = TILE_FLAGS["masks"],
        mask_mpp: Optional[float] = TILE_FLAGS["mask_mpp"],
        writer: Optional[str] = TILE_FLAGS["writer"],
        tiles_table: Optional[str] = TILE_FLAGS["tiles_table"],
        replace_table: bool = typer.Option(False, "--replace-table", help="Replace the whole tile table."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                                help="Live tile counts (default: when the terminal is interactive)."),
        profile: bool = typer.Option(False, "--profile", help="Record seconds and tiles per stage in runs.profile."),
        force: bool = typer.Option(False, "--force", help="Redo the given slides: probe them again and re-tile "
                                                         "them even when unchanged and already tiled with this config."),
    ) -> None:
        flags = {k: v for k, v in locals().items()
                 if k not in ("inputs", "config", "lake", "replace_table", "job", "progress", "profile", "force")}
        _run_job(job, inputs, config, lake, replace_table, progress, profile, force, **flags)

    return command


@app.command("masks")
def masks_command(
    inputs: Optional[list[str]] = typer.Argument(None, help="Only these slides (default: every ok slide)."),
    config: Optional[str] = _ConfigOpt,
    lake: Optional[str] = _LakeOpt,
    mask_mpp: Optional[float] = TILE_FLAGS["mask_mpp"],
    assumed_mpp: Optional[float] = TILE_FLAGS["assumed_mpp"],
    writer: Optional[str] = TILE_FLAGS["writer"],
) -> None:
    """Compute tissue masks (overlay TIFFs + QC pictures) of slides in <lake>/slides into <lake>/masks."""
    _run_job("masks", inputs, config, lake, False, mask_mpp=mask_mpp, assumed_mpp=assumed_mpp, writer=writer)


app.command("tile", help="Tile slides already in <lake>/slides (all ok slides, or the given inputs).")(
    _tiling_command("tile"))
app.command("run", help="Discover the inputs, make their masks, then tile them (one run).")(_tiling_command("run"))


@app.command()
def sql(
    query: str = typer.Argument(..., help="SQL over the views slides, masks, tiles, tile_errors, runs."),
    lake: str = typer.Option("lake", "--lake", help="Lake root folder."),
    tiles_table: str = typer.Option("tiles", "--tiles-table", help="Tile table name under the lake."),
    limit: int = typer.Option(50, help="Rows to print at most."),
) -> None:
    """Run a SQL query on the lake's tables (registered as temporary views)."""
    from slidelake.config import PipelineConfig, TablesConfig
    from slidelake.lake import TABLES, Lake
    from slidelake.spark import get_spark

    spark = get_spark()
    lake_ = Lake.open(spark, PipelineConfig(lake=lake, tables=TablesConfig(tiles_table=tiles_table)))
    for name in TABLES:
        if lake_.exists(name):
            lake_.read(name).createOrReplaceTempView(name)
    try:
        df = spark.sql(query)
    except Exception as exc:  # noqa: BLE001 - AnalysisException, ParseException
        console.print(f"[red]query failed:[/red] {exc}", markup=True)
        raise typer.Exit(1) from exc
    cols = [f.name for f in df.schema.fields if f.dataType.typeName() != "binary"]
    rows = df.select(*cols).limit(limit).collect()
    table = Table(*cols)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    console.print(table)
    console.print(f"{len(rows)} row(s)" + (f" (first {limit})" if len(rows) == limit else ""))


def main() -> None:  # pragma: no cover - console entry
    """Entry point for ``python -m slidelake.cli``."""
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
