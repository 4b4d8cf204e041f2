"""A lake in an S3 bucket, read by ``slidelake sql`` and by other Delta readers, against a real
S3-compatible server on loopback (SeaweedFS)."""

import json

import polars as pl
import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from conftest import S3_KEYS, make_tiff
from slidelake.cli import app
from slidelake.config import PipelineConfig
from slidelake.pipeline import run_all

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
