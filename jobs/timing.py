"""Where a thread's wall time goes: seconds per activity, for the time budget of ``reloop run``'s summary.

Each stage of the loop (the trainer actor, the serving thread, the feature job thread) keeps one
:class:`StageTimes` and wraps what it does, including its waits, so the summary can say which stage waited
on which (issue 15: the loop is bound by latency, not by any one stage's speed).

>>> times = StageTimes()
>>> with times("learn"):
...     pass
>>> times.add("wait: examples", 0.5)
>>> sorted(times.as_dict()), times.as_dict()["wait: examples"]
(['learn', 'wait: examples'], 0.5)
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimes:
    """Wall seconds per named activity of one thread (one writer; readers take a copy with :meth:`as_dict`)."""

    def __init__(self) -> None:
        self._seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, activity: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[activity] += time.perf_counter() - t0

    def add(self, activity: str, seconds: float) -> None:
        self._seconds[activity] += seconds

    def as_dict(self, ndigits: int = 3) -> dict[str, float]:
        return {k: round(v, ndigits) for k, v in dict(self._seconds).items()}
