"""Writing around the page cache (O_DIRECT): the file holds exactly the bytes written, whatever
their sizes; Parquet written through it is byte-identical to Parquet written to the path; the
fallback where O_DIRECT is refused; a failed device write is raised, not lost."""

from __future__ import annotations

import errno
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slidelake import direct_io
from slidelake.direct_io import BLOCK, BUFFER_BYTES, BUFFERS, DirectFile, open_for_write


def _direct_or_skip(path) -> DirectFile:
    f = open_for_write(str(path))
    if not isinstance(f, DirectFile):
        f.close()
        pytest.skip(f"the filesystem of {path.parent} refuses O_DIRECT")
    return f


@pytest.mark.parametrize("sizes", [
    [],  # an empty file
    [1],
    [BLOCK - 1, 2],  # across a block
    [BUFFER_BYTES],  # exactly one buffer: no tail
    [BUFFER_BYTES - 7, 7, 1],  # a buffer then one byte
    [3 * BUFFER_BYTES + 12345],  # one write spanning several buffers
    [100_000] * 130 + [17],  # many writes of a Parquet page's size
])
def test_direct_file_holds_exactly_the_bytes_written(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    path = tmp_path / "f.bin"
    f = _direct_or_skip(path)
    for c in chunks:
        assert f.write(c) == len(c)
    assert f.tell() == sum(sizes)
    f.close()
    f.close()  # idempotent
    assert path.read_bytes() == b"".join(chunks)
    with pytest.raises(ValueError, match="closed"):
        f.write(b"x")


def test_parquet_through_direct_file_is_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (40, 256 * 256 * 3), dtype=np.uint8)
    table = pa.table({"tile": pa.array([t.tobytes() for t in tiles], pa.binary()),
                      "tile_x": pa.array(np.arange(40, dtype=np.int64) * 256)})
    kw = dict(compression={"tile": "none", "tile_x": "zstd"}, use_dictionary=["tile_x"])

    with pq.ParquetWriter(str(tmp_path / "plain.parquet"), table.schema, **kw) as w:
        for i in range(0, 40, 7):
            w.write_table(table.slice(i, 7))
    f = _direct_or_skip(tmp_path / "direct.parquet")
    with pq.ParquetWriter(f, table.schema, **kw) as w:
        for i in range(0, 40, 7):
            w.write_table(table.slice(i, 7))
    f.close()

    assert (tmp_path / "direct.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
    assert pq.read_table(str(tmp_path / "direct.parquet")).equals(table)


def test_buffered_file_when_asked_or_when_o_direct_is_refused(tmp_path, monkeypatch):
    f = open_for_write(str(tmp_path / "a.bin"), direct=False)
    assert not isinstance(f, DirectFile)
    f.write(b"abc")
    f.close()
    assert (tmp_path / "a.bin").read_bytes() == b"abc"

    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refuse_direct)
    f = open_for_write(str(tmp_path / "b.bin"))
    assert not isinstance(f, DirectFile)
    f.write(b"xyz")
    f.close()
    assert (tmp_path / "b.bin").read_bytes() == b"xyz"

    with pytest.raises(FileNotFoundError):  # other errors are not hidden by the fallback
        open_for_write(str(tmp_path / "missing" / "c.bin"))


def test_a_failed_device_write_is_raised_and_the_file_closed(tmp_path, monkeypatch):
    f = _direct_or_skip(tmp_path / "full.bin")

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "write", no_space)
    for _ in range(BUFFERS - 1):
        f.write(b"\0" * BUFFER_BYTES)  # full buffers go to the background thread
    with pytest.raises(OSError, match="No space"):
        f.write(b"\0" * BUFFER_BYTES)  # every buffer is taken: waits for the oldest write
    assert f.closed
    # its buffers went back to the process's pool once each (a buffer handed out twice would
    # mix two files' bytes)
    assert len({id(b) for b in direct_io._pool}) == len(direct_io._pool) >= BUFFERS
    with pytest.raises(OSError, match="No space"):
        g = _direct_or_skip(tmp_path / "tail.bin")
        g.write(b"tail")
        g.close()  # the tail is written at close
    assert g.closed


def test_a_device_refusing_the_alignment_gets_the_bytes_through_the_page_cache(tmp_path, monkeypatch):
    """EINVAL from a direct write (a logical block larger than BLOCK): O_DIRECT is turned off for
    the rest of the file and no byte is lost."""
    import fcntl

    real_write = os.write
    refused = []

    def picky(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    path = tmp_path / "big-blocks.bin"
    f = _direct_or_skip(path)
    monkeypatch.setattr(direct_io.os, "write", picky)
    data = np.random.default_rng(3).integers(0, 256, 2 * BUFFER_BYTES + 5000, dtype=np.uint8).tobytes()
    f.write(data)
    f.close()
    assert refused == [BUFFER_BYTES]  # the first write only; the rest went through the page cache
    assert path.read_bytes() == data
