"""Discovery: find slide files and read their metadata into ``slides`` rows.

Two halves:

* :func:`list_inputs` (driver, pure Python) expands files, folders, glob patterns and manifests
  into a pandas frame of absolute paths plus manifest attributes;
* :func:`probe_slide` (runs on executors) fingerprints one file and opens it with OpenSlide.
  It never raises: a file that cannot be read becomes a row with ``status='error'``.

:func:`discover` ties them together as a Spark DataFrame with :data:`SLIDES_SCHEMA`.

``slide_id`` is the first 16 hex digits of the SHA-256 of the file's bytes (for MIRAX, the
``.mrxs`` file followed by the files of its data folder, in name order), so it depends on
content only: the same slide under two paths has one ``slide_id``, and renaming or moving a
file keeps it. Label and macro images are never read.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from slidelake.dicom import collapse_series, is_dicom, series_files
from slidelake.manifest import patient_splits, read_manifest, with_manifest_fields
from slidelake.rows import SlideRow, spark_schema

if TYPE_CHECKING:
    from slidelake.config import PipelineConfig
    from slidelake.lake import Lake
    from slidelake.lineage import RunRecord

SLIDES_SCHEMA = spark_schema(SlideRow)

from slidelake.config import PROPERTY_ALLOWLIST, StorageConfig  # noqa: E402 - re-exported
from slidelake.slide_cache import companions, list_objects, local_copy, object_info  # noqa: E402
from slidelake.spark import local_frame  # noqa: E402
from slidelake.storage import is_remote  # noqa: E402

# Where level-0 mpp is looked up, in order (as TRIDENT's chain). TIFF resolution tags are in
# pixels per unit; ``_tiff_mpp`` converts them.
MPP_PROPERTIES: tuple[tuple[str, str], ...] = (
    ("openslide.mpp-x", "openslide.mpp-y"),
    ("aperio.MPP", "aperio.MPP"),
)

_READ_CHUNK = 1 << 20


def _file_parts(path: str) -> list[str]:
    """Files whose bytes make up the slide: MIRAX adds its data folder (same stem); a DICOM
    file stands for the ``VOLUME`` files of its series (:func:`slidelake.dicom.series_files`)."""
    if is_dicom(path):
        return series_files(path)
    parts = [path]
    if path.lower().endswith(".mrxs"):
        data_dir = os.path.splitext(path)[0]
        if os.path.isdir(data_dir):
            parts += sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir))
    return parts


def fingerprint_file(path: str, parts: list[str] | None = None) -> str:
    """SHA-256 hex digest of a slide's bytes (``parts``, default :func:`_file_parts` of
    ``path``, in order), streamed through one reused 1 MiB buffer (bounded memory; no new buffer
    per chunk: 0.11 s instead of 0.12-0.14 s for the 194 MB benchmark slide, the rest is SHA-256
    itself).

    Raises:
        OSError: the file (or a MIRAX data file, a DICOM series' level file) cannot be read.
    """
    h = hashlib.sha256()
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    for part in parts if parts is not None else _file_parts(path):
        with open(part, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def slide_id_from_fingerprint(fingerprint: str) -> str:
    """``slide_id``: the first 16 hex digits of the content fingerprint."""
    return fingerprint[:16]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and f == f else None


def _tiff_mpp(props: dict[str, str]) -> tuple[float | None, float | None]:
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    per_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    xr, yr = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if per_um is None or xr is None:
        return None, None
    return per_um / xr, per_um / (yr or xr)


def mpp_from_properties(props: dict[str, str]) -> tuple[float | None, float | None, str | None]:
    """Level-0 mpp (µm/px) from slide properties, with the property it came from.

    Looks at ``openslide.mpp-x/y``, then ``aperio.MPP``, then the TIFF resolution tags
    (``tiff.XResolution`` per ``tiff.ResolutionUnit``, centimetre or inch).

    Returns:
        ``(mpp_x, mpp_y, source)``, or ``(None, None, None)`` when nothing usable is present.
    """
    for kx, ky in MPP_PROPERTIES:
        x, y = _float(props.get(kx)), _float(props.get(ky))
        if x is not None:
            return x, (y if y is not None else x), kx
    x, y = _tiff_mpp(props)
    if x is not None:
        return x, y, "tiff.XResolution"
    return None, None, None


def objective_from_properties(props: dict[str, str]) -> float | None:
    """Objective magnification (e.g. 20.0) from ``openslide.objective-power`` or vendor keys."""
    for k in ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens"):
        v = _float(props.get(k))
        if v is not None:
            return v
    return None


def probe_slide(path: str, properties: Sequence[str] = PROPERTY_ALLOWLIST,
                storage: StorageConfig | None = None) -> dict[str, Any]:
    """Fingerprint and open one slide; never raises.

    Args:
        path: absolute path of the file, or ``s3://`` URI of the object (opened from its local
            copy, :func:`slidelake.slide_cache.local_copy`, fingerprinted on the way).
        properties: slide property names copied into ``properties`` (an allowlist: scanner
            facts only, never free text that may identify a patient).
        storage: how an ``s3://`` object is reached and cached.

    Returns:
        A dict with the fields of :data:`SLIDES_SCHEMA` except ``attributes``, ``run_id`` and
        ``discovered_at``. ``status`` is ``'ok'`` or ``'error'`` with ``error`` set to
        ``"<ExceptionType>: message"``.
    """
    import openslide  # executor-side import

    row: dict[str, Any] = {k: None for k in SLIDES_SCHEMA.fieldNames()}
    row.update(path=path, status="error")
    try:
        if is_remote(path):
            local, fp, files = _probe_object(path, row, storage)
        else:
            local, fp, files = _probe_file(path, row)
        row["fingerprint"] = fp
        row["files"] = files
        row["slide_id"] = slide_id_from_fingerprint(fp)
        fmt = openslide.OpenSlide.detect_format(local)
        if fmt is None:
            raise ValueError("not a slide format OpenSlide can read")
        with openslide.OpenSlide(local) as slide:
            props = dict(slide.properties)
            dims = slide.level_dimensions
            downs = slide.level_downsamples
            # decode a small region of the coarsest level: catches many broken files early
            last = slide.level_count - 1
            lw, lh = dims[last]
            slide.read_region((0, 0), last, (max(1, min(lw, 64)), max(1, min(lh, 64))))
        mpp_x, mpp_y, src = mpp_from_properties(props)
        row.update(
            vendor=props.get("openslide.vendor") or fmt,
            width=int(dims[0][0]),
            height=int(dims[0][1]),
            level_count=len(dims),
            levels=[
                {"level": i, "width": int(w), "height": int(h), "downsample": float(d)}
                for i, ((w, h), d) in enumerate(zip(dims, downs))
            ],
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            mpp_source=src,
            objective_power=objective_from_properties(props),
            properties={k: str(props[k]) for k in properties if k in props},
            status="ok",
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
    return row


def _probe_file(path: str, row: dict[str, Any]) -> tuple[str, str, list[str]]:
    """Size and time of the file ``path`` into ``row``; ``(path, fingerprint, files)``."""
    st = os.stat(path)
    row["file_size"] = int(st.st_size)
    row["modified_at"] = datetime.fromtimestamp(st.st_mtime, tz=timezone.utc).replace(tzinfo=None)
    if not os.path.isfile(path):
        raise OSError(f"not a regular file: {path}")
    if st.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    parts = _file_parts(path)
    return path, fingerprint_file(path, parts), [os.path.relpath(p, os.path.dirname(path)) for p in parts]


def _probe_object(uri: str, row: dict[str, Any], storage: StorageConfig | None) -> tuple[str, str, list[str]]:
    """Size and time of the object ``uri`` into ``row``; ``(local copy, fingerprint, files)``."""
    if is_dicom(uri):
        raise ValueError("DICOM series on object storage are not read yet: copy the series to a folder")
    size, mtime = object_info(uri, storage)
    row["file_size"] = size
    row["modified_at"] = datetime.fromtimestamp(mtime, tz=timezone.utc).replace(tzinfo=None)
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    local, fp = local_copy(uri, storage)
    folder = uri.rsplit("/", 1)[0] + "/"
    return local, fp, [p[len(folder):] for p in [uri, *companions(uri, storage)]]


def _matches(name: str, extensions: Sequence[str]) -> bool:
    low = name.lower()
    return any(low.endswith("." + e.lower().lstrip(".")) for e in extensions)


def _excluded(path: str, patterns: Sequence[str]) -> bool:
    name = os.path.basename(path).lower()
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


def _walk(folder: str, extensions: Sequence[str], recursive: bool) -> Iterator[str]:
    if not recursive:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and _matches(entry.name, extensions):
                yield entry.path
        return
    # followlinks=False: a symlinked folder loop cannot make the walk run forever
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        # MIRAX data folders hold .dat/.ini files only; never descend into hidden folders
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in sorted(files):
            if _matches(f, extensions):
                yield os.path.join(root, f)


def list_inputs(inputs: Sequence[str], extensions: Sequence[str], recursive: bool = True,
                exclude: Sequence[str] = (), storage: StorageConfig | None = None) -> pd.DataFrame:
    """Expand inputs into one row per slide path.

    Args:
        inputs: file paths, folders, glob patterns (``*``, ``?``, ``[``, ``**``), or manifests
            (``.csv``/``.parquet`` with a ``path`` column; relative paths are relative to the
            manifest's folder). A path given explicitly is kept whatever its extension (it then
            becomes an error row if it is not a slide); folders and globs keep only
            ``extensions``. An ``s3://`` URI is an object, a prefix (a folder) or a prefix with
            a name pattern; a manifest's ``s3://`` paths stay as they are.
        extensions: slide file extensions without dot, e.g. ``["svs", "ome.tiff"]``.
        recursive: descend into sub-folders.
        exclude: file-name glob patterns (case-insensitive) skipped in folders and globs, e.g.
            overlay sidecars ``*.mask.tiff``.
        storage: how ``s3://`` inputs are listed.

    Returns:
        pandas frame with ``path`` (absolute, normalised) and ``attributes`` (dict of manifest
        columns as strings, empty for non-manifest inputs); one row per distinct path, the
        first mention winning.

    Raises:
        FileNotFoundError: an input that is neither an existing path nor a glob with matches
            nor a manifest.
    """
    rows: list[dict[str, Any]] = []
    for item in inputs:
        low = item.lower()
        if is_remote(item):
            names = list_objects(item, recursive, storage)
            rows += [{"path": p, "attributes": {}} for p in names
                     if p == item or (_matches(p, extensions) and not _excluded(p, exclude))]
        elif (low.endswith(".csv") or low.endswith(".parquet")) and os.path.isfile(item):
            m = read_manifest(item)
            extra = [c for c in m.columns if c != "path"]
            for rec in m.to_dict("records"):
                rows.append({
                    "path": rec["path"],
                    "attributes": {c: (None if pd.isna(rec[c]) else str(rec[c])) for c in extra},
                })
        elif os.path.isdir(item):
            rows += [{"path": os.path.abspath(p), "attributes": {}} for p in _walk(item, extensions, recursive)
                     if not _excluded(p, exclude)]
        elif os.path.lexists(item):
            rows.append({"path": os.path.abspath(item), "attributes": {}})
        elif any(c in item for c in "*?["):
            hits = sorted(glob.glob(item, recursive=True))
            rows += [{"path": os.path.abspath(p), "attributes": {}} for p in hits
                     if os.path.isfile(p) and _matches(p, extensions) and not _excluded(p, exclude)]
        else:
            raise FileNotFoundError(f"input not found: {item}")
    out = pd.DataFrame(rows, columns=["path", "attributes"])
    out["path"] = [p if is_remote(p) else os.path.normpath(p) for p in out["path"]]
    # a DICOM series is one slide, listed by its level-0 file; its label and overview never are
    slide_of = collapse_series([p for p in out["path"] if is_dicom(p) and not is_remote(p)])
    out["path"] = [slide_of.get(p, p) for p in out["path"]]
    out = out[out["path"].notna()]
    return out.drop_duplicates(subset="path", keep="first").reset_index(drop=True)


def unchanged_since(row: SlideRow, path: str, storage: StorageConfig | None = None) -> bool:
    """True when ``row`` (the path's previous ``slides`` row) was ``ok`` and the file (or
    object) at ``path`` still has its size and modification time, so its fingerprint and
    header facts still hold without reading the file again."""
    if row.get("status") != "ok" or row.get("modified_at") is None:
        return False
    try:
        if is_remote(path):
            size, when = object_info(path, storage)
        else:
            st = os.stat(path)
            size, when = int(st.st_size), st.st_mtime
    except OSError:
        return False
    mtime = datetime.fromtimestamp(when, tz=timezone.utc).replace(tzinfo=None)
    prev = row["modified_at"]
    prev = prev.astimezone(timezone.utc).replace(tzinfo=None) if prev.tzinfo is not None else prev
    return size == row.get("file_size") and mtime == prev


def _probe_row(path: str, attrs: dict | None, run_id: str, at: datetime,
               properties: Sequence[str] = PROPERTY_ALLOWLIST, storage: StorageConfig | None = None) -> dict[str, Any]:
    row = probe_slide(path, properties, storage)
    row["attributes"] = dict(attrs) if attrs is not None else {}
    row["run_id"] = run_id
    row["discovered_at"] = at
    return row


def _prober(properties: Sequence[str], on_probed: Callable[[int], None] | None = None,
            storage: StorageConfig | None = None):
    names = SLIDES_SCHEMA.fieldNames()
    props = list(properties)

    def probe_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = []
            for r in zip(pdf["path"], pdf["attributes"], pdf["run_id"], pdf["discovered_at"]):
                out.append(_probe_row(*r, props, storage))
                if on_probed is not None:
                    on_probed(1)
            yield pd.DataFrame(out, columns=names)

    return probe_batches


def discover(spark: SparkSession, paths: pd.DataFrame, run_id: str, on_driver_below: int = 0,
             properties: Sequence[str] = PROPERTY_ALLOWLIST,
             on_probed: Callable[[int], None] | None = None,
             storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Probe every listed path; one ``slides`` row (a dict of :data:`SLIDES_SCHEMA`) per path.

    Fewer than ``on_driver_below`` paths are probed on the driver, one thread per core (as
    Spark lists fewer than ``spark.sql.sources.parallelPartitionDiscovery.threshold`` paths on
    the driver: a Spark job's start-up costs more than a few probes); otherwise on the
    executors (``mapInPandas``, one file per call).

    Args:
        spark: the session.
        paths: output of :func:`list_inputs`.
        run_id: written to each row's ``run_id``.
        on_driver_below: see above; 0 always uses Spark.
        properties: slide properties copied (allowlist, see :func:`probe_slide`).
        on_probed: called with 1 after each file (the live progress), or None.
        storage: how ``s3://`` slides are reached and cached.
    """
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    data = [(p, a, run_id, now) for p, a in zip(paths["path"], paths["attributes"])]
    if not data:
        return []
    if len(data) < on_driver_below:
        from concurrent.futures import ThreadPoolExecutor

        props = list(properties)

        def one(r: tuple) -> dict[str, Any]:
            row = _probe_row(*r, props, storage)
            if on_probed is not None:
                on_probed(1)
            return row

        with ThreadPoolExecutor(max_workers=min(len(data), os.cpu_count() or 1)) as pool:
            return list(pool.map(one, data))
    src_schema = T.StructType([
        T.StructField("path", T.StringType(), False),
        T.StructField("attributes", T.MapType(T.StringType(), T.StringType()), True),
        T.StructField("run_id", T.StringType(), True),
        T.StructField("discovered_at", T.TimestampType(), True),
    ])
    n = max(1, min(len(data), spark.sparkContext.defaultParallelism * 4))
    src = local_frame(spark, data, src_schema).repartition(n, "path")
    spark.sparkContext.setJobDescription("discover")
    return [r.asDict(recursive=True)
            for r in src.mapInPandas(_prober(properties, on_probed, storage), schema=SLIDES_SCHEMA).collect()]


def select_rows_for_tiling(rows: list[SlideRow]) -> list[SlideRow]:
    """The slides to tile from ``slides`` rows (dicts): ``ok`` rows, one per ``slide_id``
    (content seen under several paths is tiled once, from the lexicographically first path), in
    ``slide_id`` order. Runs on the driver: a run tiles at most a few thousand slides."""
    best: dict[str, SlideRow] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        cur = best.get(r["slide_id"])
        if cur is None or r["path"] < cur["path"]:
            best[r["slide_id"]] = r
    return [best[k] for k in sorted(best)]


def discover_slides(lake: Lake, cfg: PipelineConfig, rec: RunRecord, force: bool = False,
                    progress: bool = False) -> list[SlideRow]:
    """The discovery stage: list ``cfg.inputs``, probe the files, merge into ``slides``.

    A path whose ``slides`` row is ``ok`` and whose size and modification time are unchanged
    keeps its row (no re-hashing: a nightly scan of an archive reads only new or changed
    files); ``force`` probes every file again. Rows of paths scanned again replace their
    previous rows (no duplicates; concurrent runs scanning other paths keep theirs). A
    ``resolution.assumed_mpp`` fills mpp (``mpp_source='assumed'``) for readable slides that
    have none. ``progress`` shows the files probed on stderr.

    Returns:
        The rows of this scan as dicts (:data:`SLIDES_SCHEMA`), one per path.
    """
    from slidelake.lineage import utcnow
    from slidelake.progress import StageProgress
    from slidelake.resolution import with_assumed_mpp
    from slidelake.tables import sql_in, to_stored

    with rec.stage("discover"):
        listed = list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive, cfg.discovery.exclude,
                             cfg.storage)
        given = patient_splits(list(listed["attributes"]), cfg)  # a contradiction stops the run before any read
        before = {r["path"]: r for r in lake.read_rows("slides", SLIDES_SCHEMA)}
        now = utcnow()
        reused, fresh = [], []
        for i, (p, attrs) in enumerate(zip(listed["path"], listed["attributes"])):
            old = before.get(p)
            if not force and old is not None and unchanged_since(old, p, cfg.storage):
                r = {**old, "attributes": dict(attrs or {}), "run_id": rec.run_id, "discovered_at": now}
                if r["mpp_source"] == "assumed":  # re-applied below from this run's config
                    r.update(mpp_x=None, mpp_y=None, mpp_source=None)
                reused.append(r)
            else:
                fresh.append(i)
        probed = lake.spark.sparkContext.accumulator(0)
        with StageProgress(lake.spark, "files probed", len(fresh), lambda: probed.value, progress):
            rows = discover(lake.spark, listed.iloc[fresh].reset_index(drop=True), rec.run_id,
                            cfg.discovery.on_driver_below, cfg.discovery.properties,
                            probed.add if progress else None, cfg.storage) + reused
        rows = [with_assumed_mpp(r, cfg.resolution.assumed_mpp) if r["status"] == "ok" else r
                for r in with_manifest_fields(rows, given, cfg)]
    with rec.stage("write"):
        where = sql_in("path", [to_stored(r["path"], lake.path_root) for r in rows])
        res = lake.write_rows("slides", rows, SLIDES_SCHEMA, mode="overwrite", replace_where=where)
        rec.table_versions["slides"] = res.version if res.version is not None else -1
    n_ok = sum(1 for r in rows if r["status"] == "ok")
    rec.counts.update(slides_discovered=len(rows), slides_ok=n_ok, slides_error=len(rows) - n_ok,
                      slides_unchanged=len(reused))
    for r in rows:
        if r["status"] != "ok":
            rec.slide_error(r, "discover", r["error"])
    return rows


def listed_slides(lake: Lake, cfg: PipelineConfig) -> list[SlideRow]:
    """Rows of the ``slides`` table, only those of the listed inputs when ``cfg.inputs`` is set."""
    slides = lake.read_rows("slides", SLIDES_SCHEMA)
    if cfg.inputs:
        listed = set(list_inputs(cfg.inputs, cfg.discovery.extensions, cfg.discovery.recursive,
                                 cfg.discovery.exclude)["path"])
        slides = [r for r in slides if r["path"] in listed]
    return slides


__all__ = [
    "SLIDES_SCHEMA", "PROPERTY_ALLOWLIST", "fingerprint_file", "slide_id_from_fingerprint",
    "mpp_from_properties", "objective_from_properties", "probe_slide", "list_inputs",
    "unchanged_since", "discover", "select_rows_for_tiling", "discover_slides", "listed_slides",
]
