"""Worker memory measurement (the ``*.worker_peak_mib`` figures of ``--profile``)."""

import sys

import numpy as np
import pytest

from slidelake.lineage import SumLog
from slidelake.memory import peak_rss_mib, release_memory, reset_peak_rss

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux /proc files")


@linux
def test_peak_rss_follows_an_allocation_and_resets():
    release_memory()
    reset_peak_rss()
    before = peak_rss_mib()
    a = np.ones(96 * 2**20, np.uint8)  # 96 MiB, touched
    during = peak_rss_mib()
    assert during - before >= 90
    del a
    release_memory()
    reset_peak_rss()
    after = peak_rss_mib()  # the peak now starts again from the current resident set
    assert after < during - 80


def test_profile_sums_times_and_keeps_the_largest_peak():
    log = SumLog()
    acc = log.zero({})
    for part in ({"decode.batch_s": 1.5, "decode.worker_peak_mib": 300.0},
                 {"decode.batch_s": 2.0, "decode.worker_peak_mib": 250.0}):
        acc = log.addInPlace(acc, part)
    assert acc == {"decode.batch_s": 3.5, "decode.worker_peak_mib": 300.0}


def test_freeze_long_lived_keeps_collections_of_later_garbage():
    """The objects alive at the first call leave the collector's view (once); garbage made later
    is still collected, so a frozen worker does not leak its tasks' reference cycles."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import gc, weakref
        import pandas, pyarrow  # what a worker holds: many tracked objects
        from slidelake.memory import freeze_long_lived
        gc.collect()
        alive = len(gc.get_objects())
        freeze_long_lived()
        frozen = gc.get_freeze_count()
        assert frozen >= alive > 10_000, (frozen, alive)
        assert len(gc.get_objects()) < alive // 100  # what a full collection walks now

        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle made by a task
        gone = weakref.ref(a)
        del a, b
        freeze_long_lived()  # a later task: no-op, the cycle stays collectable
        assert gc.get_freeze_count() == frozen
        gc.collect()
        assert gone() is None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
