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
