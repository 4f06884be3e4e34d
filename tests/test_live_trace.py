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


def test_the_predictions_log_writes_what_monitor_parses_to_each_users_default_partition() -> None:
    """Records built from escaped strings: valid JSON that ``parse_prediction`` reads back, hostile ids included,
    each sent to the partition kafka-python's default partitioner gives its key."""
    import json

    import numpy as np
    import pyarrow as pa
    from kafka.partitioner.default import DefaultPartitioner

    from jobs.monitor import PredictionRecord, parse_prediction
    from reloop.live import PredictionLog

    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, bytes, int]] = []

        def partitions_for(self, topic: str) -> set[int]:
            return {0, 1, 2, 3}

        def send(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
            self.sent.append((key, value, partition))

    class Cluster:
        def topics(self) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3}

        available_partitions_for_topic = partitions_for_topic

    log = PredictionLog(None, "t", 'r"1', ("age",), client=Producer())
    users = ["196", 'u"\\n\x00é', "196", "22"]
    table = pa.table(
        {
            "event_id": ["a", "b\u2028", "c", "d"],
            "ts": [1, 2, 3, 4],
            "user_id": users,
            "item_id": ["x", "y", "z", "w"],
            "label": pa.array([1, 0, 0, 1], pa.int8()),
            "age": [31.0, float("nan"), 40.0, None],
        }
    )
    p = np.array([0.1234567, 0.5, float("nan"), 0.9])
    log(table, p, p, np.array([0.2, np.nan, 0.3, 0.4]), "v000001")
    for (key, value, part), user, j in zip(log.producer.sent, users, range(4)):
        rec = json.loads(value)
        assert rec["user_id"] == user and key == user.encode() and rec["run_id"] == 'r"1'
        assert part == DefaultPartitioner().partition("t", key, key, value, value, Cluster())
        assert ("p_prev" in rec) == (j != 1) and ("age" in rec) == (j in (0, 2))
        got = parse_prediction(value)
        if j == 2:  # a non-finite probability is null on the topic, and the monitor refuses it with a reason
            assert rec["p"] is None and isinstance(got, str)
        else:
            assert (
                isinstance(got, PredictionRecord) and got.p == round(float(p[j]), 6) and got.model_version == "v000001"
            )


def test_each_versions_first_row_is_kept_and_recounted_on_resume() -> None:
    trace = Trace()
    for version in ("v1", "v1", "v2", "v1", "v3"):
        t = pa.table({"ts": [1, 2], "label": np.ones(2, np.int8), "user_id": ["u", "v"], "event_id": ["a", "b"]})
        trace.add(t, np.full(2, 0.5), np.full(2, 0.5), version=version)
        if version == "v2":
            trace.arrays()  # rows merged into the buffers count as much as rows still in chunks
    assert trace.first_rows == {"v1": 0, "v2": 4, "v3": 8}
    a = trace.arrays()
    assert len(a["version"]) == 10
    for v, first in trace.first_rows.items():
        assert int(np.flatnonzero(a["version"] == v)[0]) == first
    trace.first_rows = {}
    trace.reindex()
    assert trace.first_rows == {"v1": 0, "v2": 4, "v3": 8}


def test_arrays_are_the_rows_so_far_and_stay_so_while_the_trace_grows() -> None:
    trace, seen = Trace(), []
    for i in range(300):  # past several doublings of the buffers
        t = pa.table(
            {"ts": [2 * i, 2 * i + 1], "label": np.ones(2, np.int8), "user_id": ["u", "v"], "event_id": ["a", "b"]}
        )
        trace.add(t, np.full(2, i / 300), np.full(2, 0.5), version=f"v{i // 100}")
        if i % 37 == 0:
            seen.append((trace.arrays(), 2 * (i + 1)))
    a = trace.arrays()
    assert a["ts"].tolist() == list(range(600)) and len(a["version"]) == 600 and a["p_base"].dtype == np.float64
    for old, n in seen:  # an earlier call's arrays are still exactly the rows it saw
        assert len(old["ts"]) == n and old["ts"].tolist() == list(range(n))
        assert old["p_base"].tolist() == a["p_base"][:n].tolist()
