"""Lakes in an S3 bucket, made by slidelake and read by ``slidelake sql`` and by other Delta
readers, against a real S3-compatible server on loopback (SeaweedFS)."""

import json
import shutil

import polars as pl
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable
from typer.testing import CliRunner

from conftest import CMU, DAPI, S3_KEYS, make_tiff, need
from slidelake.cli import app
from slidelake.config import PipelineConfig
from slidelake.pipeline import run_all, run_tile
from slidelake.storage import read_bytes

QUERY = "SELECT slide_id, slide_label, attributes['stain'] AS stain, count(*) AS n FROM tiles GROUP BY 1, 2, 3"


@pytest.fixture(scope="module")
def bucket_lake(spark, s3_server, tmp_path_factory):
    """A lake made locally (two generated slides with a manifest) and copied byte for byte into
    ``s3://lakes/<name>``; returns ``(local lake, s3 uri)``."""
    base = tmp_path_factory.mktemp("s3lake")
    for k in (0, 1):
        make_tiff(base / f"s{k}.tiff", 384, 256, tile=64, seed=k)
    (base / "m.csv").write_text("path,label,stain\n" + "".join(f"{base / f's{k}.tiff'},L{k},HE\n" for k in (0, 1)))
    lake = base / "lake"
    run_all(spark, PipelineConfig.model_validate({
        "inputs": [str(base / "m.csv")], "lake": str(lake), "resolution": {"level": 0}, "grid": {"tile_extent": 128},
        "masks": {"enabled": False}, "filter": {"max_background_fraction": None}}))
    s3 = pafs.S3FileSystem(access_key=S3_KEYS["AWS_ACCESS_KEY_ID"], secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override="127.0.0.1:8333", scheme="http", region="us-east-1")
    pafs.copy_files(str(lake), "lakes/generated", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    return lake, "s3://lakes/generated"


def _sql(lake, env, *args):
    return CliRunner().invoke(app, ["sql", QUERY, "--lake", str(lake), *args], env=env)


def test_sql_reads_a_lake_in_a_bucket_as_it_reads_it_on_disk(bucket_lake, s3_server):
    local, uri = bucket_lake
    got = {}
    for where in (local, uri):
        res = _sql(where, s3_server, "--format", "json")
        assert res.exit_code == 0, res.output
        got[str(where)] = sorted(json.dumps(r, sort_keys=True) for r in json.loads(res.output))
    assert got[str(local)] == got[uri] and len(got[uri]) == 2
    # other Delta readers read the bucket too (delta-rs through polars), with the same keys
    opts = {k.lower(): v for k, v in s3_server.items()}
    assert pl.read_delta(f"{uri}/tiles", storage_options=opts).height == pl.read_delta(str(local / "tiles")).height == 12


def test_bad_credentials_or_bucket_is_one_line_without_the_secret(bucket_lake, s3_server):
    _, uri = bucket_lake
    wrong = {**s3_server, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    res = _sql(uri, wrong)
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"storage error: cannot read {uri}: 403 Forbidden (credentials and endpoint come from AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL)"]
    assert "not-the-secret" not in res.output and S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in res.output
    res = _sql("s3://no-such-bucket/lake", s3_server)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("storage error: cannot read s3://no-such-bucket/lake: 404 Not Found")
    res = _sql("s3://lakes/no-lake-here", s3_server)
    assert res.exit_code == 2 and res.output.strip().startswith("no tables: s3://lakes/no-lake-here holds no")


# ------------------------------------------------------------------ a lake made in the bucket


@pytest.fixture(scope="module")
def s3_env(spark, s3_server):
    """The server's AWS variables in this process (delta-rs, pyarrow) and in the session's
    Python workers, which take ``SparkContext.environment`` (a run started from a shell has them
    in every process from the start)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.items():
            mp.setenv(k, v)
        env = spark.sparkContext.environment
        before = dict(env)
        env.update(s3_server)
        yield s3_server
        env.clear()
        env.update(before)


def _objects(uri: str) -> dict[str, int]:
    """``{key under uri: bytes}`` of every object under ``uri``."""
    from slidelake.storage import filesystem

    fs, prefix = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _tile_rows(where: str, opts: dict | None = None) -> pl.DataFrame:
    cols = ["slide_id", "tile_id", "tile_x", "tile_y", "level", "tissue_fraction", "tile"]
    return pl.read_delta(f"{where}/tiles", storage_options=opts).select(cols).sort("tile_id")


def _lake_cfg(lake: str, **extra) -> PipelineConfig:
    need(CMU, DAPI)
    return PipelineConfig.model_validate({
        "inputs": [str(CMU), str(DAPI)], "lake": lake, "tables": {"writer": "delta-rs"},
        "masks": {"on_driver_below": 0}, **extra})  # masks made by the Spark workers, as on a cluster


@pytest.fixture(scope="module")
def bucket_runs(spark, s3_env, tmp_path_factory):
    """Two slides (Aperio, Hamamatsu) run into ``s3://lakes/made`` twice and once into a local
    lake with the same settings: ``(first, second, local record, local lake)``."""
    local = tmp_path_factory.mktemp("s3same") / "lake"
    first = run_all(spark, _lake_cfg("s3://lakes/made"))
    second = run_all(spark, _lake_cfg("s3://lakes/made"))
    here = run_all(spark, _lake_cfg(str(local)))
    return first, second, here, local


@pytest.mark.spark
def test_a_run_writes_every_table_and_overlay_into_the_bucket(bucket_runs, s3_env):
    first, _, here, local = bucket_runs
    opts = {k.lower(): v for k, v in s3_env.items()}
    assert first.status == here.status == "succeeded" and first.counts == here.counts
    assert first.counts["slides_tiled"] == 2 and first.counts["tiles_written"] > 20
    got, want = _tile_rows("s3://lakes/made", opts), _tile_rows(str(local))
    assert got.height == first.counts["tiles_written"] and got.equals(want)  # the same tiles, byte for byte
    keys = _objects("s3://lakes/made")
    for table in ("slides", "masks", "tiles", "run_slides", "runs"):
        assert f"{table}/_delta_log/00000000000000000000.json" in keys, table
    assert not [k for k in keys if "/_staging/" in k]  # every staged file committed or removed
    masks = pl.read_delta("s3://lakes/made/masks", storage_options=opts)
    assert masks.height == 2 and set(masks["status"]) == {"ok"}
    for m in masks.iter_rows(named=True):  # overlay, thumbnail and QC picture in the lake
        for col in ("mask_path", "thumbnail_path", "qc_path"):
            assert m[col].startswith("s3://lakes/made/overlays/") and m[col].split("/made/")[1] in keys, col
        mine = m["mask_path"].replace("s3://lakes/made", str(local))
        assert read_bytes(m["mask_path"]) == open(mine, "rb").read()  # the same overlay file


@pytest.mark.spark
def test_a_rerun_on_the_bucket_skips_every_slide_and_adds_nothing(bucket_runs, s3_env):
    first, second, _, _ = bucket_runs
    opts = {k.lower(): v for k, v in s3_env.items()}
    assert second.status == "succeeded"
    assert second.counts["slides_unchanged"] == second.counts["slides_skipped"] == 2
    assert second.counts["tiles_written"] == 0
    t = _tile_rows("s3://lakes/made", opts)
    assert t.height == first.counts["tiles_written"] and t["tile_id"].is_duplicated().sum() == 0
    assert DeltaTable("s3://lakes/made/tiles").version() == 0  # one commit: the first run's
    assert pl.read_delta("s3://lakes/made/runs", storage_options=opts).height == 2


@pytest.mark.spark
def test_no_credential_reaches_a_table_or_the_lake(bucket_runs, s3_env):
    keys = _objects("s3://lakes/made")
    secret, key_id = s3_env["AWS_SECRET_ACCESS_KEY"].encode(), s3_env["AWS_ACCESS_KEY_ID"].encode()
    texts = [k for k in keys if k.endswith((".json", ".parquet"))]
    assert len(texts) > 10
    for k in texts:
        data = read_bytes(f"s3://lakes/made/{k}")
        assert secret not in data and key_id not in data, k
    config = json.loads(pl.read_delta("s3://lakes/made/runs", storage_options={
        k.lower(): v for k, v in s3_env.items()})["config"][0])
    assert config["storage"] == {"endpoint": None, "region": None, "path_style": None, "cache_dir": None, "cache_gb": 50.0}


@pytest.mark.spark
def test_two_processes_commit_to_one_table_in_the_bucket(s3_env, tmp_path):
    """delta-rs commits to S3 with conditional writes (``If-None-Match: *`` on the log entry):
    concurrent writers need no lock service where the store supports them (AWS S3 since 2024,
    SeaweedFS here)."""
    from test_incremental import check_concurrent_writes, concurrent_writers

    concurrent_writers(str(tmp_path / "meet"), "s3://lakes/concurrent")
    opts = {k.lower(): v for k, v in s3_env.items()}
    check_concurrent_writes(pl.read_delta("s3://lakes/concurrent/runs", storage_options=opts),
                            DeltaTable("s3://lakes/concurrent/runs").version())


@pytest.mark.spark
@pytest.mark.parametrize("writer", ["delta-rs", "spark"])
def test_driver_killed_before_commit_leaves_the_bucket_tables_then_rerun_completes(spark, s3_env, tmp_path, writer):
    """The driver of a run into the bucket (two executor JVMs) is killed once the workers have
    staged tile files: the tables stay as they were; the staged objects are never part of a
    table and are deleted once stale; running again completes without duplicates. With Spark's
    Delta writer the lake is ``s3a://`` (Hadoop's S3A, the jars of ``jobs/fetch_jars.sh s3`` on
    the embedded session's class path, the endpoint from ``AWS_ENDPOINT_URL``)."""
    from test_faults import _cfg, _result, _run

    from slidelake.tables import clean_stale_staging

    need(CMU)
    uri, opts = f"s3://lakes/faults-{writer}", {k.lower(): v for k, v in s3_env.items()}
    lake = uri.replace("s3://", "s3a://") if writer == "spark" else uri
    other = tmp_path / "other.tiff"
    make_tiff(other, 300, 200, mpp=0.5, seed=5)
    cfg = _cfg(uri, other)
    cfg.tables.writer = "delta-rs"  # this session has no Delta jars; the runs below use `writer`
    run_all(spark, cfg)
    before, version = _tile_rows(uri, opts), DeltaTable(f"{uri}/tiles").version()

    proc = _run(lake, CMU, "driver", writer)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, mid-run
    assert DeltaTable(f"{uri}/tiles").version() == version and _tile_rows(uri, opts).equals(before)
    staged = [k for k in _objects(f"{uri}/tiles") if k.startswith("_staging/")]
    assert staged and all(k.endswith(".parquet") for k in staged)
    assert len(clean_stale_staging(f"{uri}/tiles", max_age_s=0)) == 1  # as a run does after 24 h
    assert not [k for k in _objects(f"{uri}/tiles") if k.startswith("_staging/")]

    again = _result(_run(lake, CMU, "none", writer))
    assert again["status"] == "succeeded" and again["writer"] == writer
    assert again["counts"]["tiles_written"] == 18 * 24
    t = _tile_rows(uri, opts)
    assert t.height == before.height + 18 * 24 and t["tile_id"].is_duplicated().sum() == 0
    engines = {e for e in pl.read_ndjson(_log(f"{uri}/tiles"))["commitInfo"].struct.field("engineInfo") if e}
    assert any(e.startswith("Apache-Spark/") for e in engines) == (writer == "spark"), engines


def _log(table: str):
    """The last commit of the Delta table ``table`` (``s3://``), as a file object."""
    import io

    dt = DeltaTable(table)
    return io.BytesIO(read_bytes(f"{table}/_delta_log/{dt.version():020d}.json"))


@pytest.mark.spark
def test_server_stopped_mid_run_fails_it_leaving_the_tables_then_rerun_completes(spark, s3_env, tmp_path):
    """The S3 server holding the lake is killed once the workers have staged tile files: the
    run fails (the process exits non-zero), the tiles table is as it was; with the server back,
    running again completes without duplicates."""
    from conftest import restart_s3_server
    from test_faults import _cfg, _result, _run

    need(CMU)
    uri, opts = "s3://lakes/outage", {k.lower(): v for k, v in s3_env.items()}
    other = tmp_path / "other.tiff"
    make_tiff(other, 300, 200, mpp=0.5, seed=6)
    cfg = _cfg(uri, other)
    cfg.tables.writer = "delta-rs"
    run_all(spark, cfg)
    before, version = _tile_rows(uri, opts), DeltaTable(f"{uri}/tiles").version()
    runs = pl.read_delta(f"{uri}/runs", storage_options=opts).height

    proc = _run(uri, CMU, "server")
    restart_s3_server()
    assert proc.returncode not in (0, -9) and "RESULT" not in proc.stdout, proc.stderr[-3000:]
    assert S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
    assert DeltaTable(f"{uri}/tiles").version() == version and _tile_rows(uri, opts).equals(before)
    assert pl.read_delta(f"{uri}/runs", storage_options=opts).height == runs  # its row could not be written

    again = _result(_run(uri, CMU, "none"))
    assert again["status"] == "succeeded" and again["counts"]["tiles_written"] == 18 * 24
    t = _tile_rows(uri, opts)
    assert t.height == before.height + 18 * 24 and t["tile_id"].is_duplicated().sum() == 0


@pytest.mark.spark
def test_cli_run_into_a_bucket_with_the_storage_section(spark, s3_env, tmp_path):
    """``slidelake run --lake s3://...`` with the endpoint and region in the config's ``storage``
    section and only the keys in the environment; wrong keys or a missing bucket: one line and
    exit 2 before any work, no secret printed."""
    need(CMU)
    conf = tmp_path / "s3.yaml"
    conf.write_text("storage:\n  endpoint: http://127.0.0.1:8333\n  region: us-east-1\n"
                    "tables:\n  writer: delta-rs\n")
    keys_only = {**S3_KEYS, "AWS_ENDPOINT_URL": None, "AWS_REGION": None, "AWS_ALLOW_HTTP": None}
    args = ["run", str(CMU), "-c", str(conf), "--level", "0", "--tile-extent", "512"]
    res = CliRunner().invoke(app, [*args, "--lake", "s3://lakes/cli"], env=keys_only)
    assert res.exit_code == 0, res.output
    assert S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in res.output
    opts = {k.lower(): v for k, v in s3_env.items()}
    assert pl.read_delta("s3://lakes/cli/tiles", storage_options=opts).height == _tile_rows(
        "s3://lakes/cli", opts).height > 0

    wrong = {**keys_only, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    res = CliRunner().invoke(app, [*args, "--lake", "s3://lakes/cli-wrong"], env=wrong)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("storage error: cannot reach s3://lakes/cli-wrong: ACCESS_DENIED (credentials from")
    assert "not-the-secret" not in res.output and not _objects("s3://lakes/cli-wrong")
    res = CliRunner().invoke(app, [*args, "--lake", "s3://no-such-bucket/lake"], env=keys_only)
    assert res.exit_code == 2 and res.output.strip() == (
        "storage error: cannot reach s3://no-such-bucket/lake: no such bucket")


# ------------------------------------------------------------------ slides in the bucket


@pytest.fixture(scope="module")
def bucket_slides(s3_env):
    """The CMU (Aperio) and DAPI (Hamamatsu) samples uploaded to ``s3://lakes/slides/<vendor>/``."""
    from slidelake.storage import write_bytes

    need(CMU, DAPI)
    for p in (CMU, DAPI):
        write_bytes(f"s3://lakes/slides/{p.parent.name}/{p.name}", p.read_bytes())
    return "s3://lakes/slides/"


def _slides_cfg(inputs: list, lake: str, cache, **extra) -> PipelineConfig:
    return PipelineConfig.model_validate({"inputs": inputs, "lake": lake, "tables": {"writer": "delta-rs"},
                                          "storage": {"cache_dir": str(cache)}, **extra})


@pytest.mark.spark
def test_slides_in_a_bucket_give_the_tiles_of_the_same_files_on_disk(spark, s3_env, bucket_slides, tmp_path):
    """A run over a bucket prefix: the slides are listed there, fingerprinted while they are
    copied into the bounded cache (the same slide ids as on disk) and tiled to the same tiles,
    byte for byte, as the files on disk; the tables keep the URIs; a rerun reads nothing again."""
    cache = tmp_path / "cache"
    remote = run_all(spark, _slides_cfg([bucket_slides], str(tmp_path / "from-bucket"), cache))
    here = run_all(spark, _slides_cfg([str(CMU), str(DAPI)], str(tmp_path / "from-disk"), cache))
    assert remote.status == "succeeded" and remote.counts == here.counts and remote.counts["slides_tiled"] == 2
    got, want = _tile_rows(str(tmp_path / "from-bucket")), _tile_rows(str(tmp_path / "from-disk"))
    assert got.height == remote.counts["tiles_written"] > 20 and got.equals(want)
    slides = pl.read_delta(str(tmp_path / "from-bucket" / "slides")).sort("path")
    assert slides["path"].to_list() == [f"{bucket_slides}aperio/{CMU.name}", f"{bucket_slides}hamamatsu/{DAPI.name}"]
    assert slides["file_size"].to_list() == [CMU.stat().st_size, DAPI.stat().st_size]
    assert set(pl.read_delta(str(tmp_path / "from-bucket" / "tiles"))["path"]) == set(slides["path"])
    copies = sorted(p.name for p in cache.rglob("*") if p.suffix in (".svs", ".ndpi"))
    assert copies == sorted([CMU.name, DAPI.name])  # discovery streams each object once
    again = run_all(spark, _slides_cfg([bucket_slides], str(tmp_path / "from-bucket"), cache))
    assert again.counts["slides_unchanged"] == again.counts["slides_skipped"] == 2



@pytest.mark.spark
def test_tiles_of_a_slide_not_in_the_cache_come_by_ranged_reads(spark, s3_env, tmp_path):
    """Discovery, then the slide cache emptied, as on an executor that did not discover the
    slides: the Aperio slide's mask and tiles are read from the object by ranged GETs (reader
    'native', no copy made); the NDPI file, which only OpenSlide reads, is copied; masks and
    tiles equal the same files' on disk."""
    from slidelake.pipeline import run_discover, run_masks
    from slidelake.storage import write_bytes

    need(CMU, DAPI)
    for p in (CMU, DAPI):
        write_bytes(f"s3://lakes/ranged/{p.name}", p.read_bytes())
    cache, lake = tmp_path / "cache", str(tmp_path / "lake")
    cfg = _slides_cfg(["s3://lakes/ranged/"], lake, cache)
    run_discover(spark, cfg)
    shutil.rmtree(cache)
    run_masks(spark, cfg)
    rec = run_tile(spark, cfg, profile=True)
    here = run_all(spark, _slides_cfg([str(CMU), str(DAPI)], str(tmp_path / "disk"), cache))
    assert rec.status == "succeeded" and rec.counts["tiles_written"] == here.counts["tiles_written"] > 20
    assert _tile_rows(lake).equals(_tile_rows(str(tmp_path / "disk")))
    masks = [pl.read_delta(f"{where}/masks").sort("slide_id").select("slide_id", "tissue_fraction", "read_level")
             for where in (lake, str(tmp_path / "disk"))]
    assert masks[0].equals(masks[1]) and masks[0].height == 2
    assert sorted(p.name for p in cache.rglob("*") if p.suffix in (".svs", ".ndpi")) == [DAPI.name]
    readers = pl.read_delta(f"{lake}/tiles").group_by("path").agg(pl.col("reader").unique())
    assert {r["path"]: r["reader"] for r in readers.iter_rows(named=True)} == {
        f"s3://lakes/ranged/{CMU.name}": ["native"], f"s3://lakes/ranged/{DAPI.name}": ["openslide"]}
    # this crop is mostly tissue: about the file once (each worker reads the TIFF header);
    # fetching stored tiles again per output tile would be several times more
    assert 0 < rec.profile["decode.fetched_bytes"] < 1.5 * CMU.stat().st_size


@pytest.mark.spark
def test_a_slide_object_deleted_before_tiling_is_an_error_and_the_other_is_tiled(spark, s3_env, tmp_path):
    """Discovery sees two objects; one is deleted before the tile job over the table's slides
    (its local copy still in the cache): that slide fails with the object named, the other is
    tiled."""
    from slidelake.pipeline import run_discover, run_tile
    from slidelake.storage import filesystem, write_bytes

    need(CMU, DAPI)
    for p in (CMU, DAPI):
        write_bytes(f"s3://lakes/doomed/{p.name}", p.read_bytes())
    cfg = _slides_cfg(["s3://lakes/doomed/"], str(tmp_path / "lake"), tmp_path / "cache")
    assert run_discover(spark, cfg).counts["slides_ok"] == 2
    fs, key = filesystem(f"s3://lakes/doomed/{DAPI.name}")
    fs.delete_file(key)
    rec = run_tile(spark, cfg.model_copy(update={"inputs": []}))  # every slide of the table
    assert rec.status == "succeeded" and rec.counts["slides_tiled"] == 1
    (err,) = rec.slide_errors
    assert err["path"] == f"s3://lakes/doomed/{DAPI.name}" and "no such object" in err["error"]
    tiles = pl.read_delta(str(tmp_path / "lake" / "tiles"))
    assert set(tiles["path"]) == {f"s3://lakes/doomed/{CMU.name}"} and tiles.height > 0


def test_the_slide_cache_keeps_the_recently_used_and_fits_its_size(tmp_path):
    """Eviction: least recently used first, never a copy used in the last ``IN_USE_S`` seconds."""
    import os
    import time

    from slidelake.config import StorageConfig
    from slidelake.slide_cache import evict

    cfg = StorageConfig(cache_dir=str(tmp_path), cache_gb=6.5e-9)  # 6.5 bytes: two of the 3-byte copies
    now = time.time()
    for name, age in (("old", 7200), ("older", 9000), ("fresh", 10)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "s.svs").write_bytes(b"x")
        (tmp_path / name / ".source.json").write_text("{}")
        os.utime(tmp_path / name / ".source.json", (now - age, now - age))
    gone = evict(cfg)
    assert gone == [str(tmp_path / "older")]  # 9 bytes over 6.5: the least recently used goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "old"]
    assert evict(cfg, incoming=100) == [str(tmp_path / "old")]  # "fresh" is in use: kept even over the size
