"""Memory of the Python worker processes: give freed heap back, and measure each stage's peak.

* :func:`release_memory` hands freed heap pages back to the OS (glibc ``malloc_trim``), so a
  reused worker does not carry one stage's working arrays into the next.
* :func:`freeze_long_lived` takes the objects a worker holds for good (its imported modules)
  out of the garbage collector's view once, so the full collection PySpark runs after each
  task of a reused worker stays cheap.
* :func:`reset_peak_rss` and :func:`peak_rss_mib` measure the peak resident set size of a
  worker during one stage: Linux keeps the peak (``VmHWM`` in ``/proc/self/status``) and resets
  it when ``5`` is written to ``/proc/self/clear_refs`` (``proc(5)``, Linux >= 4.0). With
  ``--profile`` each stage reports its peak as ``<stage>.worker_peak_mib`` in ``runs.profile``
  (the largest over the stage's workers).

Elsewhere (macOS, or a kernel without these files) the functions do nothing and the peak is 0.

:class:`LRU` is the one cache of what a worker keeps between batches and tasks: open slide
handles, native readers, overlay indexes, decoded stored tiles.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class LRU:
    """A least-recently-used cache of at most ``size`` values, made on a miss by the caller's
    ``make()``; ``close(value)`` (e.g. a file handle's close) is called on each value evicted or
    dropped. Not thread-safe (one per worker process or per reader)."""

    def __init__(self, size: int, close: Callable[[Any], None] | None = None) -> None:
        self.size, self.close = size, close
        self.items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, made by ``make()`` when absent (then the least recently used
        values beyond ``size`` are evicted). Raises what ``make`` raises (nothing is cached)."""
        items = self.items
        if key in items:
            items.move_to_end(key)
            return items[key]
        value = items[key] = make()
        while len(items) > self.size:
            self._closed(items.popitem(last=False)[1])
        return value

    def __len__(self) -> int:
        return len(self.items)

    def drop(self, key: Hashable | None = None) -> None:
        """Forget ``key`` (every value when None), closing what is dropped."""
        for k in list(self.items) if key is None else [key]:
            if k in self.items:
                self._closed(self.items.pop(k))

    def _closed(self, value: Any) -> None:
        if self.close is not None and value is not None:
            self.close(value)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (``gc.collect`` then glibc ``malloc_trim(0)``;
    a no-op elsewhere). A mask's working arrays are tens of MiB; without this, glibc keeps the
    freed pages and a reused Python worker carries them into the decode stage (measured in
    ``docs/benchmarks.md``)."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS without a garbage collection: glibc
    ``malloc_trim(0)`` and Arrow's memory pool ``release_unused()``; a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - an older pyarrow without it
        pass


_LIBC = None
_FROZEN = False


def freeze_long_lived() -> None:
    """Once per process: move every object the garbage collector tracks now to its permanent
    generation (``gc.freeze``, Python >= 3.7), so later collections skip them.

    A reused Python worker runs a full ``gc.collect()`` after every task (``pyspark/daemon.py``,
    ``SPARK_REUSE_WORKER``), and with pandas, pyarrow, PySpark, tifffile and the codecs
    imported it walks ~100,000 objects: 35-80 ms between two tasks of the decode stage
    (``docs/benchmarks.md``). A stage's function calls this when its first task starts, before
    making anything of its own; what is alive then is the imports and PySpark's worker state,
    which live as long as the process. Objects made afterwards (slide handles, caches, tiles)
    are collected as usual. A no-op after the first call.
    """
    global _FROZEN
    if not _FROZEN:
        import gc

        gc.freeze()
        _FROZEN = True


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement for this process (``VmHWM`` := current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident set size of this process since the last :func:`reset_peak_rss` (or since
    it started), MiB; 0.0 where ``/proc`` does not tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


__all__ = ["LRU", "release_memory", "trim_heap", "freeze_long_lived", "reset_peak_rss", "peak_rss_mib"]
