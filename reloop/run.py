"""``reloop run``: the whole loop on one machine with the embedded defaults.

This first version runs the thinnest real path: start the local broker, replay
the dataset into a fresh events topic of this run, and consume every event
back through the parser, checking that none was lost or duplicated.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass

from reloop.config import ReloopConfig
from reloop.datasets import load_dataset
from reloop.events import Event, parse_event


@dataclass
class RunSummary:
    run_id: str
    dataset: str
    events_replayed: int
    events_consumed: int
    events_valid: int
    replay_events_per_s: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def run(cfg: ReloopConfig, dataset: str = "movielens-100k", limit: int | None = None,
        speed: float | None = None) -> RunSummary:
    from reloop import services
    from reloop.kafka_io import end_offsets, read_range
    from reloop.replay import replay_table

    t0 = time.perf_counter()
    if cfg.kafka.bootstrap_servers == services.KAFKA_BOOTSTRAP:
        services.get("kafka").start()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    topic = f"{cfg.kafka.events_topic}.{run_id}"
    table = load_dataset(dataset, limit=limit)
    stats = replay_table(table, cfg.kafka, topic=topic, speed=speed, progress=True)
    consumed = valid = 0
    seen: set[str] = set()
    for partition, end in end_offsets(cfg.kafka, topic).items():
        for _, _, value in read_range(cfg.kafka, topic, partition, 0, end):
            consumed += 1
            ev = parse_event(value)
            if isinstance(ev, Event) and ev.event_id not in seen:
                seen.add(ev.event_id)
                valid += 1
    return RunSummary(run_id, dataset, stats.events, consumed, valid, stats.events_per_s, time.perf_counter() - t0)
