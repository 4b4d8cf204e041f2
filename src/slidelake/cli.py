"""Command line: ``slidelake discover | masks | tile | run | sql``.

Settings come from a YAML file (``--config conf/<name>.yaml``) and are overridden by flags.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable, NamedTuple, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Whole-slide images to Delta tables of tiles (slides, tiles, runs).")
console = Console(soft_wrap=True)  # messages stay one line (no wrapping at the terminal width)


def _version(show: bool) -> None:
    if show:
        from slidelake import __version__

        console.print(f"slidelake {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", help="Show Spark's own log lines.")) -> None:
    """Whole-slide images to Delta tables of tiles (slides, tiles, runs)."""
    import logging

    if verbose:
        os.environ["SLIDELAKE_VERBOSE"] = "1"  # read when the session starts (slidelake.spark.local_conf)
        return
    # PySpark logs every failed query as a JSON record with its stack; the CLI prints one line itself
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


_ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (see conf/).")
_LakeOpt = typer.Option(None, "--lake", help="Lake root folder holding the Delta tables.")


def _xy(v: str) -> list[int]:
    parts = [int(p) for p in v.replace("x", ",").split(",") if p]
    return parts * 2 if len(parts) == 1 else parts


def _roi(v: str) -> list[int]:
    return [int(p) for p in v.split(",")]


class Flag(NamedTuple):
    """A config flag of the tiling commands: its type, the config key it sets
    (``section.key``), its ``typer.Option`` and how its text becomes the config value."""

    type: type
    key: str
    option: Any
    parse: Callable[[Any], Any] | None = None


# every config flag, declared once: the commands take the ones they name (:func:`_command`)
FLAGS: dict[str, Flag] = {
    "level": Flag(int, "resolution.level", typer.Option(None, help="Pyramid level to tile (0 = full resolution).")),
    "mpp": Flag(float, "resolution.mpp", typer.Option(None, help="Tile resolution in µm/px.")),
    "downsample": Flag(float, "resolution.downsample",
                       typer.Option(None, help="Tile resolution as downsample from level 0.")),
    "magnification": Flag(float, "resolution.magnification",
                          typer.Option(None, help="Tile resolution as magnification (10/mag µm/px).")),
    "fallback": Flag(str, "resolution.fallback", typer.Option(None, help="error | nearest | floor | ceil | resample.")),
    "tolerance": Flag(float, "resolution.tolerance",
                      typer.Option(None, help="Relative downsample deviation accepted as a match.")),
    "assumed_mpp": Flag(float, "resolution.assumed_mpp",
                        typer.Option(None, "--assumed-mpp", help="Level-0 µm/px for slides without mpp.")),
    "tile_extent": Flag(str, "grid.tile_extent",
                        typer.Option(None, "--tile-extent", help="Tile size in px, '256' or '256,512'."), _xy),
    "stride": Flag(str, "grid.stride",
                   typer.Option(None, help="Stride in px, '224' or 'x,y' (overlap = extent - stride)."), _xy),
    "last": Flag(str, "grid.last", typer.Option(None, help="Edge policy: keep | drop | shift.")),
    "roi": Flag(str, "grid.roi", typer.Option(None, help="Rectangle 'x,y,w,h' in level-0 px."), _roi),
    "tile_roi": Flag(str, "grid.tile_roi",
                     typer.Option(None, "--tile-roi", help="WKT polygon in tile px: fractions are computed inside it.")),
    "encoding": Flag(str, "decode.encoding", typer.Option(None, help="raw | png | jpeg | webp.")),
    "quality": Flag(int, "decode.quality", typer.Option(None, help="JPEG/WebP quality 1-100.")),
    "batch_size": Flag(int, "decode.batch_size",
                       typer.Option(None, "--batch-size", help="Tiles per decode batch (worker memory).")),
    "min_std": Flag(float, "filter.min_std", typer.Option(None, "--min-std", help="Keep tiles with grey std >= this.")),
    "max_background_fraction": Flag(float, "filter.max_background_fraction", typer.Option(
        None, "--max-background", help="Keep tiles with background fraction <= this.")),
    "min_tissue_fraction": Flag(float, "filter.min_tissue_fraction", typer.Option(
        None, "--min-tissue", help="Keep tiles whose tissue fraction >= this (before decode).")),
    "min_annotated_fraction": Flag(float, "filter.min_annotated_fraction", typer.Option(
        None, "--min-annotated", help="Keep tiles whose annotated fraction >= this (before decode).")),
    "masks": Flag(bool, "masks.enabled", typer.Option(
        None, "--masks/--no-masks", help="Compute tissue masks and filter on them (default: on).")),
    "mask_mpp": Flag(float, "masks.mpp", typer.Option(None, "--mask-mpp", help="Mask resolution in µm/px (default 8).")),
    "writer": Flag(str, "tables.writer", typer.Option(None, help="Delta writer: auto | spark | delta-rs.")),
    "tiles_table": Flag(str, "tables.tiles_table",
                        typer.Option(None, "--tiles-table", help="Tile table name under the lake.")),
}
TILING_FLAGS = tuple(FLAGS)


def _overrides(inputs: list[str] | None, lake: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of a command line: ``inputs``, ``lake`` and each flag given, at
    its config key (:data:`FLAGS`)."""
    o: dict[str, Any] = {}
    if inputs:
        o["inputs"] = list(inputs)
    if lake:
        o["lake"] = lake
    for name, value in flags.items():
        if value is not None:
            flag = FLAGS[name]
            section, key = flag.key.split(".")
            o.setdefault(section, {})[key] = flag.parse(value) if flag.parse else value
    return o


def _load(config: Optional[str], overrides: dict[str, Any]):
    from slidelake.config import load_config

    try:
        return load_config(config, overrides)
    except ValidationError as exc:
        for line in config_errors(exc):
            console.print(f"[red]config error:[/red] {line}", highlight=False)
        raise typer.Exit(2) from exc
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc


def flag_of(key: str) -> str | None:
    """The command-line flag that sets config ``key`` (``section.key``), e.g. ``--assumed-mpp``
    for ``resolution.assumed_mpp``; None when no flag does."""
    for name, flag in FLAGS.items():
        if flag.key == key:
            decls = getattr(flag.option, "param_decls", None) or ()
            return decls[0] if decls else "--" + name.replace("_", "-")
    return None


def config_errors(exc: ValidationError) -> list[str]:
    """One line per problem of a config: where (``section.key``, and its flag), what pydantic
    says without its documentation URL, and the value given."""
    out = []
    for e in exc.errors(include_url=False):
        key = ".".join(str(part) for part in e["loc"])
        flag = flag_of(key)
        msg = e["msg"].removeprefix("Value error, ")
        given = f" (got {e['input']!r})" if len(e["loc"]) > 1 and not isinstance(e["input"], dict) else ""
        out.append(f"{key}{f' ({flag})' if flag else ''}: {msg}{given}")
    return out


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


def _run_job(job: str, inputs: list[str] | None, config: str | None, lake: str | None, flags: dict[str, Any],
             replace_table: bool = False, progress: Optional[bool] = None, profile: bool = False,
             force: bool = False) -> None:
    from slidelake.pipeline import ConfigMismatchError, run_all, run_discover, run_masks, run_tile
    from slidelake.manifest import ManifestError
    from slidelake.spark import get_spark
    from slidelake.storage import StorageError

    cfg = _load(config, _overrides(inputs, lake, flags))
    if job in ("discover", "run") and not cfg.inputs:
        console.print("[red]no inputs:[/red] give slide files/folders/manifests or 'inputs' in the config")
        raise typer.Exit(2)
    missing = [p for p in cfg.inputs if "://" not in p and not any(c in p for c in "*?[") and not os.path.exists(p)]
    if missing:  # before Spark starts
        console.print(f"[red]input not found:[/red] {', '.join(missing)}", highlight=False)
        raise typer.Exit(2)
    slides_table = os.path.join(cfg.lake, "slides", "_delta_log")
    if job in ("tile", "masks") and "://" not in cfg.lake and not os.path.isdir(slides_table):
        console.print(f"[red]no slides table:[/red] {cfg.lake} has none yet; run `slidelake discover INPUTS --lake "
                      f"{cfg.lake}` (or `slidelake run`) first", highlight=False)
        raise typer.Exit(2)
    spark = get_spark()
    show = sys.stderr.isatty() if progress is None else progress
    try:
        if job == "discover":
            rec = run_discover(spark, cfg, show)
        elif job == "masks":
            rec = run_masks(spark, cfg, show)
        else:
            job_fn = run_tile if job == "tile" else run_all
            rec = job_fn(spark, cfg, replace_table=replace_table, progress=show, profile=profile, force=force)
    except ConfigMismatchError as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(3) from exc
    except ManifestError as exc:
        console.print(f"[red]manifest error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    except StorageError as exc:
        console.print(f"[red]storage error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc
    from slidelake.lake import Lake

    _report(rec, Lake.open(spark, cfg))
    _nothing_done(rec)


def _nothing_done(rec) -> None:
    """Say so when a run did nothing: no slide files in the inputs (a warning), or every slide
    failed (exit code 4)."""
    c = rec.counts
    if c.get("slides_discovered") == 0:
        console.print("[yellow]no slide files found[/yellow] in the inputs (see discovery.extensions and "
                      "discovery.exclude in docs/config.md)", highlight=False)
    elif rec.job in ("tile", "run") and not c.get("slides_tiled") and not c.get("slides_skipped") and rec.slide_errors:
        console.print("[red]no slide was tiled:[/red] every slide failed (errors above; runs.slide_errors)",
                      highlight=False)
        raise typer.Exit(4)
    elif rec.job == "masks" and c.get("masks_failed") and not c.get("masks_computed") and not c.get("masks_reused"):
        console.print("[red]no mask was made:[/red] every slide failed (errors above; runs.slide_errors)",
                      highlight=False)
        raise typer.Exit(4)


_INPUTS = typer.Argument(None, help="Slide files, folders, globs or manifests.")
_RUN_OPTIONS = {
    "replace_table": (bool, typer.Option(False, "--replace-table", help="Replace the whole tile table.")),
    "progress": (Optional[bool], typer.Option(None, "--progress/--no-progress",
                                              help="Live progress of each stage (default: when the terminal is interactive).")),
    "profile": (bool, typer.Option(False, "--profile", help="Record seconds and tiles per stage in runs.profile.")),
    "force": (bool, typer.Option(False, "--force", help="Redo the given slides: probe them again and re-tile them "
                                                       "even when unchanged and already tiled with this config.")),
}


def _command(job: str, flags: tuple[str, ...], run_options: bool, inputs: Any = _INPUTS) -> Callable[..., None]:
    """The typer command of ``job``: ``INPUTS``, ``--config``, ``--lake``, the :data:`FLAGS`
    named in ``flags`` and, when ``run_options``, :data:`_RUN_OPTIONS` (its signature is built
    from the tables, so each flag is declared once)."""
    def command(**kw: Any) -> None:
        extra = {k: kw.pop(k) for k in _RUN_OPTIONS if k in kw}
        _run_job(job, kw.pop("inputs"), kw.pop("config"), kw.pop("lake"), kw, **extra)

    P = inspect.Parameter
    params = [P("inputs", P.KEYWORD_ONLY, default=inputs, annotation=Optional[list[str]]),
              P("config", P.KEYWORD_ONLY, default=_ConfigOpt, annotation=Optional[str]),
              P("lake", P.KEYWORD_ONLY, default=_LakeOpt, annotation=Optional[str])]
    params += [P(n, P.KEYWORD_ONLY, default=FLAGS[n].option, annotation=Optional[FLAGS[n].type]) for n in flags]
    if run_options:
        params += [P(n, P.KEYWORD_ONLY, default=opt, annotation=t) for n, (t, opt) in _RUN_OPTIONS.items()]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


app.command("discover", help="Find slides and write one row per file to <lake>/slides.")(
    _command("discover", ("assumed_mpp", "writer"), False))
app.command("masks", help="Compute tissue masks (overlay TIFFs + QC pictures) of slides in <lake>/slides into "
                          "<lake>/masks.")(
    _command("masks", ("mask_mpp", "assumed_mpp", "writer"), False,
             typer.Argument(None, help="Only these slides (default: every ok slide).")))
app.command("tile", help="Tile slides already in <lake>/slides (all ok slides, or the given inputs).")(
    _command("tile", TILING_FLAGS, True))
app.command("run", help="Discover the inputs, make their masks, then tile them (one run).")(
    _command("run", TILING_FLAGS, True))


@app.command()
def sql(
    query: str = typer.Argument(..., help="SQL over the views slides, masks, tiles, tile_errors, run_slides, runs."),
    lake: str = typer.Option("lake", "--lake", help="Lake root: a folder or s3://bucket/prefix (AWS_* environment variables)."),
    tiles_table: str = typer.Option("tiles", "--tiles-table", help="Tile table name under the lake."),
    limit: int = typer.Option(50, help="Rows to print at most."),
    output: str = typer.Option("table", "--format", help="table | csv | json (full values; binary columns left out)."),
    engine: str = typer.Option("datafusion", help="datafusion (no Spark; a folder or a bucket) | spark."),
) -> None:
    """Run a SQL query on the lake's tables."""
    from slidelake.lake import Lake
    from slidelake.query import (
        QueryError, cell_text, plain_rows, present_tables, run_query, to_csv, to_json,
    )

    if output not in ("table", "csv", "json") or engine not in ("datafusion", "spark"):
        console.print(f"[red]bad option:[/red] --format table|csv|json, --engine datafusion|spark "
                      f"(got {output}, {engine})", highlight=False)
        raise typer.Exit(2)
    lake_ = Lake(None, lake if "://" in lake else os.path.abspath(lake), "delta-rs", tiles_table)
    try:
        present = present_tables(lake_)
    except QueryError as exc:
        console.print(f"[red]storage error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc
    if not present:
        console.print(f"[red]no tables:[/red] {lake_.root} holds no slidelake tables (make them with slidelake run)",
                      highlight=False)
        raise typer.Exit(2)
    try:
        result = run_query(query, lake_, present, engine, limit)  # type: ignore[arg-type]
    except QueryError as exc:
        console.print(f"[red]query failed:[/red] {exc} (tables in {lake_.root}: {', '.join(present)})",
                      markup=True, highlight=False)
        raise typer.Exit(2) from exc
    cols, rows = plain_rows(result)
    if output == "csv":
        sys.stdout.write(to_csv(cols, rows))
        return
    if output == "json":
        sys.stdout.write(to_json(cols, rows) + "\n")
        return
    table = Table(*cols)
    for r in rows:
        table.add_row(*[cell_text(v) for v in r])
    Console(width=None if sys.stdout.isatty() else 100_000).print(table)  # piped: no wrapping
    console.print(f"{len(rows)} row(s)" + (f" (first {limit})" if len(rows) == limit else ""))


def main() -> None:  # pragma: no cover - console entry
    """Entry point for ``python -m slidelake.cli``."""
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
