"""Feature-job throughput on the local Beam runner vs a plain pandas group-by of the same aggregates.

    python benchmarks/bench_feature_job.py [--events 100000] [--out benchmarks/results/feature_job.json]

Measured in one process, on the same MovieLens-100K events (starts the local Kafka if it is down, and stops it after):

- ``job (Kafka -> Feast + examples)``: :func:`pipelines.feature_job.run_once` end to end, FnApiRunner:
  plan, read the offset ranges from Kafka, parse, aggregate, write training examples (Parquet), Feast
  online (SQLite) + offline, save state, commit; runs until the topic is drained;
- ``beam transforms (in-memory)``: the same Parse + ComputeFeatures + WriteExamples transforms on
  FnApiRunner from raw record tables already in memory (no Kafka, no Feast);
- ``pure batch (no Beam)``: parse_batch + compute_batch in a loop, the floor of the job's own code;
- reference ``pandas group-by``: the raw JSON parsed by pyarrow, then per-user and per-item rolling
  time-window counts/positives/CTR over the same windows (``closed='left'``: strictly before), all-time
  cumulative counts and seconds since the previous event, as a pandas user would write it.

Ratios are events/s of a row over events/s of the pandas reference (the machine is shared, so absolute
numbers move; the ratio is what to compare). ``cpu s`` is this process's CPU time (``time.process_time``,
all threads), which moves less than wall time on a loaded machine; the broker's CPU is not in it. Process start-up and imports (Feast alone takes seconds)
are excluded from every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import apache_beam as beam

from benchmarks.common import services_up  # noqa: E402
from pipelines.aggregates import AggregateConfig, FeatureState  # noqa: E402
from pipelines.checkpoint import Plan
from pipelines.config import FeastConfig, FeatureJobConfig, KafkaConfig, StorageConfig
from pipelines.consumer_group import partition_offsets
from pipelines.feast_io import apply_repo
from pipelines.feature_job import pipeline_options, run_once
from pipelines.kafka_io import RangeReader
from pipelines.kafka_source import raw_table
from pipelines.parse import concat_events, parse_batch
from pipelines.transforms import ComputeFeatures, ParseRecords, WriteExamples, align_partitions, compute_batch
from reloop.config import ReloopConfig
from reloop.datasets import load_dataset
from reloop.replay import encode_batch, replay_table


def pandas_reference(values: list[bytes], cfg: AggregateConfig) -> pd.DataFrame:
    """The same aggregates with plain pandas: JSON -> DataFrame -> group-by rolling windows."""
    table = pajson.read_json(pa.py_buffer(b"\n".join(values)))
    df = table.select(["event_id", "ts", "user_id", "item_id", "label"]).to_pandas()
    df["user_id"], df["item_id"] = df["user_id"].astype(str), df["item_id"].astype(str)
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    df["time"] = pd.to_datetime(df["ts"], unit="ms")
    df["one"] = 1
    out = {}
    m, prior = cfg.prior_weight, cfg.prior_ctr
    for entity in ("user", "item"):
        key = f"{entity}_id"
        g = df.groupby(key, sort=False)
        for name, w in cfg.windows_ms:
            r = df.set_index("time").groupby(key, sort=False)[["one", "label"]].rolling(f"{w}ms", closed="left").sum()
            r = r.reset_index(level=0, drop=True).fillna(0)
            # rolling returns rows grouped by key; put them back in event order
            order = np.concatenate([idx for idx in g.indices.values()])
            imp = np.empty(len(df))
            pos = np.empty(len(df))
            imp[order], pos[order] = r["one"].to_numpy(), r["label"].to_numpy()
            out[f"{entity}_imp_{name}"], out[f"{entity}_pos_{name}"] = imp, pos
            out[f"{entity}_ctr_{name}"] = (pos + m * prior) / (imp + m)
        imp_all = g.cumcount().to_numpy()
        pos_all = (g["label"].cumsum() - df["label"]).to_numpy()
        out[f"{entity}_imp_all"], out[f"{entity}_pos_all"] = imp_all, pos_all
        out[f"{entity}_ctr_all"] = (pos_all + m * prior) / (imp_all + m)
        prev = g["ts"].shift(1)
        out[f"{entity}_secs_since_last"] = np.where(prev.isna(), -1.0, (df["ts"] - prev.fillna(0)) / 1000.0)
    return pd.concat([df[["event_id", "ts", "user_id", "item_id", "label"]], pd.DataFrame(out)], axis=1)


def raw_tables(values: list[bytes], keys: list[bytes], partitions: int = 4, batch: int = 5000) -> list[pa.Table]:

    parts = [[] for _ in range(partitions)]
    for i, k in enumerate(keys):
        parts[hash(k) % partitions].append(i)
    out = []
    for p, idx in enumerate(parts):
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            out.append(
                raw_table(p, list(range(s, s + len(chunk))), [keys[i] for i in chunk], [values[i] for i in chunk])
            )
    return out


def bench_pure(raws: list[pa.Table], cfg: AggregateConfig) -> float:

    t0 = time.perf_counter()
    events = concat_events(
        [
            parse_batch(
                r["value"].to_pylist(),
                partition=int(r["kafka_partition"][0].as_py()),
                offsets=r["kafka_offset"].to_pylist(),
                now_ms=10**13,
            )[0]
            for r in raws
        ]
    )
    kept, _ = align_partitions(events, {p: 10**9 for p in range(8)})
    compute_batch(events, FeatureState.empty(), cfg)
    return time.perf_counter() - t0


def bench_beam(raws: list[pa.Table], cfg: AggregateConfig, tmp: Path) -> float:
    """The job's transforms on FnApiRunner; raw batches come from Arrow IPC files (``beam.Create`` of the
    tables themselves would pickle 10 MB into the pipeline proto, which measures Create, not the job)."""

    paths = []
    for i, t in enumerate(raws):
        paths.append(str(tmp / f"raw-{i}.arrow"))
        with pa.OSFile(paths[-1], "wb") as f, pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t)
    plan = Plan("bench", {p: 0 for p in range(4)}, {p: 10**9 for p in range(4)}, 10**13)
    t0 = time.perf_counter()
    with beam.Pipeline(options=pipeline_options([])) as p:
        raw = (
            p
            | beam.Create(paths)
            | "ReadIPC"
            >> beam.Map(lambda path: pa.ipc.open_file(pa.memory_map(path)).read_all()).with_output_types(pa.Table)
        )
        parsed = raw | ParseRecords(10**13)
        out = parsed.events | ComputeFeatures(str(tmp / "beam-state"), plan, cfg)
        _ = out.examples | WriteExamples(str(tmp / "beam-examples"), plan.run_id)
    return time.perf_counter() - t0


def bench_kafka_read(topic: str) -> float:
    """Only reading every partition of the topic (fetch + decode, no parsing): the job's input floor."""

    kafka = KafkaConfig()
    _, begin, end = partition_offsets(kafka, topic, f"{topic}.probe")
    t0 = time.perf_counter()
    with RangeReader(kafka) as reader:
        n = sum(len(cols) for p in end for cols in reader.read(topic, p, begin[p], end[p]))
    assert n == sum(end[p] - begin[p] for p in end)
    return time.perf_counter() - t0


def bench_job(table: pa.Table, tmp: Path) -> tuple[float, float, int, int, str, float]:

    topic = f"bench.features.{uuid.uuid4().hex[:8]}"
    repo = tmp / "features"
    repo.mkdir()
    for f in ("feature_repo.py", "feature_store.yaml"):
        shutil.copy(ROOT / "features" / f, repo / f)
    kafka = KafkaConfig(events_topic=topic, dlq_topic=f"{topic}.dlq", consumer_group=topic)
    cfg = ReloopConfig(
        kafka=kafka,
        feast=FeastConfig(repo_path=str(repo)),
        storage=StorageConfig(examples_uri=str(tmp / "examples")),
        feature_job=FeatureJobConfig(state_uri=str(tmp / "state")),
    )
    replay_table(table, kafka, topic=topic, workers=1)

    apply_repo(cfg.feast, str(repo))  # registry creation is a one-off, not per micro-batch
    c0, t0 = time.process_time(), time.perf_counter()
    accepted = runs = 0
    while (s := run_once(cfg, repo_path=str(repo))).committed:
        accepted += s.accepted
        runs += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # the fixed cost of one micro-batch (plan, Beam pipeline, clients, Feast, commit): 1,000 newer events
    later = table.slice(0, 1000).set_column(1, "ts", pc.add(table.slice(0, 1000)["ts"], 400 * 86_400_000))
    later = later.set_column(0, "event_id", pc.binary_join_element_wise(later["event_id"], "b", "-"))
    replay_table(later, kafka, topic=topic, workers=1)
    t1 = time.perf_counter()
    assert run_once(cfg, repo_path=str(repo)).accepted == 1000
    return seconds, cpu, accepted, runs, topic, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feature_job.json"))
    ap.add_argument("--skip-kafka", action="store_true", help="only the in-memory rows")
    args = ap.parse_args(argv)

    table = load_dataset("movielens-100k", limit=args.events)
    keys, values = encode_batch(table.to_batches(max_chunksize=table.num_rows)[0])
    n = table.num_rows
    cfg = AggregateConfig()
    raws = raw_tables(values, keys)
    rows = []
    t_small = None
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        c0 = time.process_time()
        t0 = time.perf_counter()
        ref = pandas_reference(values, cfg)
        t_pandas = time.perf_counter() - t0
        assert len(ref) == n
        rows.append(("pandas group-by (reference)", t_pandas, time.process_time() - c0))
        c0 = time.process_time()
        rows.append(("pure batch code (no Beam)", bench_pure(raws, cfg), time.process_time() - c0))
        c0 = time.process_time()
        rows.append(("beam transforms (in-memory)", bench_beam(raws, cfg, tmp), time.process_time() - c0))
        if not args.skip_kafka:
            with services_up("kafka"):  # started (and stopped) here if it was down
                t_job, cpu_job, accepted, runs, topic, t_small = bench_job(table, tmp)  # replay, apply not timed
                assert accepted == n, f"job accepted {accepted} of {n}"
                rows.append((f"job (Kafka -> Feast + examples), {runs} run(s)", t_job, cpu_job))
                c0 = time.process_time()
                rows.append(("  of which: Kafka read alone", bench_kafka_read(topic), time.process_time() - c0))
    ref_rate = n / t_pandas
    print(f"\nfeature job vs pandas, {n:,} MovieLens-100K events, {os.cpu_count()} cores\n")
    ref_cpu_rate = n / rows[0][2]
    print(
        f"{'what':44s} {'wall s':>7s} {'events/s':>10s} {'vs pandas':>9s} {'cpu s':>7s} {'ev/cpu-s':>10s} "
        f"{'vs pandas':>9s}"
    )
    results = []
    for name, secs, cpu in rows:
        rate, cpu_rate = n / secs, n / max(cpu, 1e-9)
        print(
            f"{name:44s} {secs:7.2f} {rate:10,.0f} {rate / ref_rate:8.2f}x {cpu:7.2f} {cpu_rate:10,.0f} "
            f"{cpu_rate / ref_cpu_rate:8.2f}x"
        )
        results.append(
            {
                "name": name,
                "seconds": secs,
                "events_per_s": rate,
                "ratio_vs_pandas": rate / ref_rate,
                "cpu_seconds": cpu,
                "events_per_cpu_s": cpu_rate,
                "cpu_ratio_vs_pandas": cpu_rate / ref_cpu_rate,
            }
        )
    if t_small is not None:
        print(f"\none more micro-batch of 1,000 events (the job's fixed cost per run): {t_small:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "events": n,
                "cores": os.cpu_count(),
                "load_avg": os.getloadavg(),
                "target_events_per_s": 50_000,
                "rows": results,
                "micro_batch_1k_seconds": t_small,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
