"""Write a file around the page cache (``O_DIRECT``): the workers' tile Parquet files.

A Python worker writes each tile once and never reads it back, yet a normal ``write`` copies
every byte into the kernel's page cache first, and on a VM whose balloon device hands freed
memory back to the host each of those pages is new memory the host must back first: on the
benchmark machine that made writing a raw 256 px tile (192 KiB) cost ~0.36-0.43 ms, as much as
decoding it, and the kernel's writeback threads took CPU from the workers on top
(``docs/benchmarks.md``). :class:`DirectFile` instead fills
reused, page-aligned buffers (:data:`BUFFERS` of :data:`BUFFER_BYTES`) and writes each full one
straight to the device with ``O_DIRECT`` from a background thread while the caller fills the
next: ~0.1 ms per raw tile, most of it the device's time, not the CPU's. The buffers stay with
the process for its next file (12 MiB per Python worker), so their pages are backed once.

``O_DIRECT`` (``open(2)``) needs the buffer address, the length and the file offset aligned to
the device's logical block size. The buffers are anonymous ``mmap`` s (page-aligned), their
size is a multiple of :data:`BLOCK`, and the last, partial buffer is written padded to a block
and the file then truncated to its true length (``ftruncate(2)``), so the file's bytes are
exactly those given to :meth:`DirectFile.write`.

:func:`open_for_write` falls back to an ordinary buffered file where ``O_DIRECT`` does not
exist (macOS, Windows) or the filesystem refuses it (tmpfs: ``EINVAL``).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

BLOCK = 4096  # a multiple of every logical block size in use (512 or 4096 bytes)
BUFFER_BYTES = 4 << 20  # per buffer
BUFFERS = 3  # per open file: one filled while the others are written (a Parquet row group of
# decode.batch_mb = 8 MiB arrives in one burst)

_pool: list[mmap.mmap] = []  # free buffers of this process, reused by the next file
_pool_lock = threading.Lock()


def _take_buffer() -> mmap.mmap:
    with _pool_lock:
        if _pool:
            return _pool.pop()
    return mmap.mmap(-1, BUFFER_BYTES)


def _give_back(buf: mmap.mmap) -> None:
    with _pool_lock:
        _pool.append(buf)


class DirectFile:
    """A write-only binary file written with ``O_DIRECT`` through reused aligned buffers.

    Pass it to ``pyarrow.parquet.ParquetWriter`` (or anything that calls ``write``) and call
    :meth:`close` after the writer's own ``close``: pyarrow does not close a file object it did
    not open, and the file's last bytes are written by :meth:`close`.

    Args:
        fd: a descriptor opened with ``O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT``
            (see :func:`open_for_write`).
        path: the file's path, for error messages.

    A write the device refuses for its alignment (``EINVAL``: a logical block larger than
    :data:`BLOCK`) turns ``O_DIRECT`` off for the rest of the file, which then goes through the
    page cache with the same bytes.

    Raises:
        OSError: from the device (e.g. ``ENOSPC``), at the :meth:`write` or :meth:`close` after
            the background write that failed; the descriptor is closed then.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.name = path
        self._fd = fd
        self._free = [_take_buffer() for _ in range(BUFFERS)]
        self._buf = self._free.pop()  # the buffer being filled
        self._fill = 0  # bytes in it
        self._written = 0  # bytes handed to the device (a multiple of BUFFER_BYTES)
        self._queue: deque[tuple[Future, mmap.mmap]] = deque()  # full buffers being written, oldest first
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="slidelake-direct-io")
        self.closed = False

    # the io.RawIOBase surface pyarrow's PythonFile uses
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._written + self._fill

    def flush(self) -> None:
        """Nothing to do: bytes are written when a buffer is full and at :meth:`close`."""

    def write(self, data: Any) -> int:
        """Copy ``data`` (any bytes-like object) into the buffers; returns its length in bytes."""
        if self.closed:
            raise ValueError(f"write to closed file {self.name}")
        view = memoryview(data).cast("B")
        n, i = len(view), 0
        while i < n:
            buf = self._buf
            k = min(BUFFER_BYTES - self._fill, n - i)
            buf[self._fill:self._fill + k] = view[i:i + k]
            self._fill += k
            i += k
            if self._fill == BUFFER_BYTES:
                self._queue.append((self._thread.submit(self._write_all, self._buf, BUFFER_BYTES), self._buf))
                self._written += BUFFER_BYTES
                self._buf, self._fill = self._next_free(), 0
        return n

    def _write_all(self, buf: mmap.mmap, length: int) -> None:
        view = memoryview(buf)[:length]
        try:
            done = 0
            while done < length:  # os.write may write less than asked
                try:
                    done += os.write(self._fd, view[done:])
                except OSError as e:
                    # EINVAL: this device wants a larger alignment than BLOCK (or the filesystem
                    # accepted O_DIRECT at open but not here): go on through the page cache
                    if e.errno != errno.EINVAL or not self._drop_direct():
                        raise
        finally:
            view.release()

    def _drop_direct(self) -> bool:
        """Turn ``O_DIRECT`` off on the open descriptor (``fcntl(F_SETFL)``); False if it was off."""
        import fcntl

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def _next_free(self) -> mmap.mmap:
        """A buffer to fill: a free one, else the oldest one being written once its write is done."""
        if self._free:
            return self._free.pop()
        self._finish_oldest()
        return self._free.pop()

    def _finish_oldest(self) -> None:
        pending, buf = self._queue.popleft()
        self._free.append(buf)
        try:
            pending.result()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._thread.shutdown(wait=True)
            os.close(self._fd)
            bufs = {id(b): b for b in [self._buf, *self._free, *(b for _, b in self._queue)]}
            for b in bufs.values():  # each once: the current one may also be queued
                _give_back(b)
            self._queue.clear()
            self._free = []

    def close(self) -> None:
        """Write the last bytes (padded to :data:`BLOCK`, then the file truncated to its true
        length) and close the descriptor. Idempotent."""
        if self.closed:
            return
        try:
            while self._queue:
                self._finish_oldest()
            size = self._written + self._fill
            if self._fill:
                pad = -self._fill % BLOCK
                buf = self._buf
                buf[self._fill:self._fill + pad] = bytes(pad)
                self._write_all(buf, self._fill + pad)
                os.ftruncate(self._fd, size)
        finally:
            self._abort()

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_for_write(path: str, direct: bool = True) -> DirectFile | BinaryIO:
    """Open ``path`` for writing (created or truncated), around the page cache where possible.

    Returns a :class:`DirectFile` when ``direct`` is true and the OS and filesystem accept
    ``O_DIRECT``; otherwise an ordinary buffered binary file (``open(path, "wb")``). Either
    must be closed by the caller.

    Raises:
        OSError: the file cannot be created (missing folder, permissions).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if direct and flag:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
        else:
            return DirectFile(fd, path)
    return open(path, "wb")
