"""The live trace stays consistent while one thread adds and others read (the run's progress, gate, deployer)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from reloop.live import Trace


def test_concurrent_add_and_arrays_keep_every_row_in_every_column() -> None:
    trace, n, rows = Trace(), 3000, 7
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            trace.arrays()

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(n):
        table = pa.table(
            {
                "ts": np.arange(rows) + i * rows,
                "label": np.ones(rows, np.int8),
                "user_id": ["u"] * rows,
                "event_id": [f"e{i}-{j}" for j in range(rows)],
            }
        )
        trace.add(table, np.full(rows, 0.5), np.full(rows, 0.6))
    done.set()
    for t in readers:
        t.join()
    a = trace.arrays()
    assert {len(v) for v in a.values()} == {n * rows}
    assert (np.diff(a["ts"]) == 1).all(), "in arrival order, nothing dropped or repeated"
