"""Replay and consume throughput on the local broker, next to Kafka's own perf tools in the same run.

    python benchmarks/bench_replay.py [--events 100000]

Reference: ``org.apache.kafka.tools.ProducerPerformance`` (acks=all, idempotent, the same record
count and the mean record size of our JSON events) and ``ConsumerPerformance`` on the same broker.
The ratio (ours / Kafka's Java client) is what to compare across machines.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from pipelines.config import KafkaConfig  # noqa: E402
from pipelines.kafka_io import end_offsets, ensure_topics, read_range  # noqa: E402
from reloop import services  # noqa: E402
from reloop.datasets import load_dataset  # noqa: E402
from reloop.replay import encode_batch, replay_table  # noqa: E402


def java_tool(main: str, *args: str) -> str:
    kafka = services.Kafka()
    cmd = kafka._jvm(main, *args, heap="-Xmx512m")
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout


def producer_performance(topic: str, n: int, size: int, bootstrap: str) -> float:
    out = java_tool(
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        str(n),
        "--record-size",
        str(size),
        "--throughput",
        "-1",
        "--producer-props",
        f"bootstrap.servers={bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        "linger.ms=5",
        "batch.size=262144",
    )
    # final line: "100000 records sent, 181818.2 records/sec (17.34 MB/sec), ..."
    m = re.findall(r"([\d.]+) records/sec", out)
    return float(m[-1])


def consumer_performance(topic: str, n: int, bootstrap: str) -> float:
    out = java_tool(
        "org.apache.kafka.tools.ConsumerPerformance",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--messages",
        str(n),
        "--timeout",
        "60000",
    )
    # CSV: start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, ...
    last = [ln for ln in out.strip().splitlines() if ln and ln[0].isdigit()][-1].split(",")
    return float(last[5])


def our_consume(cfg: KafkaConfig, topic: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for partition, end in end_offsets(cfg, topic).items():
        for _ in read_range(cfg, topic, partition, 0, end):
            n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    services.get("kafka").start()
    cfg = KafkaConfig(bootstrap_servers=services.KAFKA_BOOTSTRAP)
    table = load_dataset("movielens-100k", limit=args.events)
    _, values = encode_batch(table.slice(0, 2000).to_batches()[0])
    size = round(sum(map(len, values)) / len(values))
    run = uuid.uuid4().hex[:8]
    ours_topic, ref_topic = f"bench.replay.{run}", f"bench.perf.{run}"
    ensure_topics(cfg, [ours_topic, ref_topic])

    stats = replay_table(table, cfg, topic=ours_topic)
    ref_produce = producer_performance(ref_topic, table.num_rows, size, services.KAFKA_BOOTSTRAP)
    n, secs = our_consume(cfg, ours_topic)
    assert n == table.num_rows, f"consumed {n} of {table.num_rows}"
    ref_consume = consumer_performance(ref_topic, table.num_rows, services.KAFKA_BOOTSTRAP)
    rows = [
        {
            "stage": "produce",
            "reloop events/s": stats.events_per_s,
            "kafka tool events/s": ref_produce,
            "ratio": stats.events_per_s / ref_produce,
            "reference": "ProducerPerformance",
        },
        {
            "stage": "consume",
            "reloop events/s": n / secs,
            "kafka tool events/s": ref_consume,
            "ratio": n / secs / ref_consume,
            "reference": "ConsumerPerformance",
        },
    ]
    report("replay", rows, {"events": table.num_rows, "record_bytes": size})


if __name__ == "__main__":
    main()
