"""Live progress of a run's stages on the driver: discovery (files probed), masks (slides
masked) and tiling (grid tiles done), with the rate and Spark's task counts.

Each stage feeds a Spark accumulator (or, on the driver, a plain count) as its work finishes; a
driver thread reads it twice a second together with Spark's status tracker (active stage, tasks
done / total) and renders a ``rich`` progress bar on stderr. The bar's total is known before the
stage starts and does not change; its last line gives the stage's true count and mean rate. On a
cluster the same information is in the Spark UI, whose job descriptions name the pipeline stage
(``discover``, ``masks``, ``overlap + decode + write tiles``, ...).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


class StageProgress:
    """Context manager showing ``done / total`` items of a stage, items/s and Spark task counts.

    Args:
        spark: the session (its status tracker is polled).
        what: the items counted, e.g. ``"files probed"``, ``"grid tiles"``.
        total: items the stage will go through (fixed for the stage).
        done: callable returning the items done so far (e.g. an accumulator's sum).
        enabled: False makes this a no-op (non-interactive runs, tests).
    """

    def __init__(self, spark: Any, what: str, total: int, done: Callable[[], int], enabled: bool = True) -> None:
        self.spark, self.what, self.total, self.done, self.enabled = spark, what, total, done, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tasks(self) -> str:
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for sid in tracker.getActiveStageIds():
            info = tracker.getStageInfo(sid)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        return f"tasks {done}/{total}" if total else ""

    def _run(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        start = time.perf_counter()

        def rate(n: int) -> str:
            return f"{n / max(time.perf_counter() - start, 1e-9):,.0f}/s"

        with Progress(TextColumn(f"[bold]{self.what}[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[tasks]}"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task(self.what, total=max(self.total, 1), rate="", tasks="")
            while not self._stop.wait(0.5):
                n = min(self.done(), self.total)
                bar.update(task, completed=n, rate=rate(n), tasks=self._tasks())
            n = min(self.done(), self.total)
            bar.update(task, completed=n, rate=rate(n), tasks="")

    def __enter__(self) -> "StageProgress":
        if self.enabled and self.total > 0:
            self._thread = threading.Thread(target=self._run, name="slidelake-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["StageProgress"]
