"""The feature job on local Flink (Beam portable runner, embedded Flink 1.19) vs FnApiRunner, same events.

    python benchmarks/bench_flink.py [--events 100000] [--parallelism 2]

Starts a private job server (own ports and state dir, stopped at the end, so the shared one is never
touched) and measures: its start-up time to ready; the feature job over the same replayed events on
FnApiRunner (the reference) and on Flink, each from a fresh consumer group, state, examples and Feast repo;
the job server JVM's resident memory (now and peak). The ratio Flink / FnApiRunner is the number to
compare across machines. The two runs' training examples are checked to be identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq

from benchmarks.common import report  # noqa: E402
from pipelines.config import KafkaConfig  # noqa: E402
from pipelines.feature_job import run_feature_job
from reloop import services  # noqa: E402
from reloop.datasets import load_dataset
from reloop.replay import replay_table
from tests.conftest import free_port  # noqa: E402
from tests.flink_support import flink_args, isolated_job_config  # noqa: E402


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--parallelism", type=int, default=2)
    args = ap.parse_args(argv)

    services.get("kafka").start()
    kafka = KafkaConfig(bootstrap_servers=services.KAFKA_BOOTSTRAP)
    topic = f"bench.flink.{uuid.uuid4().hex[:8]}"
    replay_table(load_dataset("movielens-100k", limit=args.events), kafka, topic=topic)

    rows, extra = [], {"events": args.events, "parallelism": args.parallelism}
    with tempfile.TemporaryDirectory(prefix="bench_flink_") as tmp:
        flink = services.Flink(
            Path(tmp) / "server", job_port=free_port(), artifact_port=free_port(), expansion_port=free_port()
        )
        t0 = time.perf_counter()
        flink.start()
        extra["job_server_start_s"] = time.perf_counter() - t0
        extra["job_server_version"] = flink.version()
        extra["jvm_rss_idle_mb"] = rss_mb(flink.pid())[0]
        try:
            outputs = {}
            for name, beam_args in (
                ("FnApiRunner", None),
                (f"Flink p={args.parallelism}", flink_args(flink.address(), args.parallelism)),
            ):
                cfg = isolated_job_config(tmp, kafka, topic, name.split()[0].lower())
                t0 = time.perf_counter()
                stats = run_feature_job(cfg, pipeline_args=beam_args, repo_path=cfg.feast.repo_path)
                seconds = time.perf_counter() - t0
                assert stats.committed and stats.records_read == args.events, stats
                outputs[name] = pq.read_table(cfg.storage.examples_uri, partitioning=None).sort_by(
                    [("ts", "ascending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")]
                )
                rows.append(
                    {
                        "runner": name,
                        "events": stats.records_read,
                        "seconds": seconds,
                        "events_per_s": stats.records_read / seconds,
                    }
                )
            ref = rows[0]["seconds"]
            for r in rows:
                r["time_vs_fnapi"] = r["seconds"] / ref
            a, b = outputs.values()
            extra["examples_identical"] = a.equals(b)
            extra["jvm_rss_after_mb"], extra["jvm_rss_peak_mb"] = rss_mb(flink.pid())
        finally:
            flink.stop()
    report("bench_flink", rows, extra)
    for k in (
        "job_server_version",
        "job_server_start_s",
        "jvm_rss_idle_mb",
        "jvm_rss_after_mb",
        "jvm_rss_peak_mb",
        "examples_identical",
    ):
        print(f"{k}: {extra[k]:.1f}" if isinstance(extra[k], float) else f"{k}: {extra[k]}")
    return 0 if extra["examples_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
