"""parse_batch (vectorised fast path + per-record fallback) agrees exactly with the event contract."""

from __future__ import annotations

import json
import random

import pytest

import pipelines.events
from pipelines.events import Event, parse_event
from pipelines.parse import parse_batch

NOW = 1_700_000_000_000
OK = {"event_id": "e", "ts": 881250949000, "user_id": "196", "item_id": "242", "label": 1}


def _variants(i: int) -> list[bytes]:
    d = dict(OK, event_id=f"e{i}")
    dumps = lambda x: json.dumps(x, separators=(",", ":")).encode()  # noqa: E731
    return [
        dumps(d),  # plain: fast path
        dumps(dict(d, user_id=196)),  # int id: accepted, as "196"
        dumps(dict(d, context={"hour": 3, "dev": "web"})),  # context
        dumps(dict(d, context=None)),
        dumps(dict(d, context={})),
        dumps(dict(d, context={"ts": 1, "z": None})),
        dumps(dict(d, context={"hour": 2.5, "ok": True})),
        dumps(dict(d, context={"s": "x" * 1025})),
        dumps(dict(d, context={"n": {"x": 1}})),
        dumps(dict(d, context=[1])),
        dumps(dict(d, context=5)),
        dumps(dict(d, context={f"k{j}": j for j in range(65)})),
        b'{"event_id":"f%d","ts":5,"user_id":"u","item_id":"i","label":1,"context":{"h":1e400}}' % i,
        dumps(dict(d, label=2)),
        dumps(dict(d, label=True)),
        b'{"event_id":"x%d","ts":5,"user_id":"u","item_id":"i","label":1.0}' % i,
        dumps(dict(d, ts=0)),
        dumps(dict(d, ts=-3)),
        dumps(dict(d, ts=NOW + 25 * 3600 * 1000)),
        dumps(dict(d, ts=NOW)),
        dumps(dict(d, ts=1.5)),
        dumps(dict(d, ts="1")),
        dumps(dict(d, ts=10**20)),
        dumps(dict(d, user_id="")),
        dumps(dict(d, user_id="ü" * 256)),
        dumps(dict(d, user_id="ü" * 257)),
        dumps(dict(d, item_id=None)),
        dumps({k: v for k, v in d.items() if k != "label"}),
        dumps(dict(d, extra=1)),
        b"[1,2]",
        b"not json",
        b"",
        b"\xff\xfe",
        json.dumps(d, indent=2).encode(),  # multi-line record
        b'{"event_id":"d%d","ts":5,"user_id":"u","item_id":"i","label":1,"label":0}' % i,  # duplicate key
        b'{"event_id":"s%d\\ud800","ts":5,"user_id":"u","item_id":"i","label":1}' % i,  # lone surrogate
        b'{"event_id":"u%d\\u00e9","ts":5,"user_id":"u","item_id":"i","label":0}' % i,  # escaped unicode
        b'{"event_id":"w%d" , "ts" : 5, "user_id":"u","item_id":"i","label":0}  ' % i,  # whitespace
        b'{"event_id":"big%d","ts":5,"user_id":"u","item_id":"i","label":0,"p":"' % i + b"x" * 70_000 + b'"}',
        b'{"event_id":"a%d","ts":5,"user_id":"u","item_id":"i","label":0}{"x":1}' % i,  # trailing object
    ]


def _reference(values, offsets):
    good, bad = {}, {}
    for off, v in zip(offsets, values):
        ev = parse_event(v, now_ms=NOW) if v is not None else None
        if isinstance(ev, Event):
            try:
                (ev.event_id + ev.user_id + ev.item_id).encode()
            except UnicodeEncodeError:
                bad[off] = "invalid unicode"
                continue
            good[off] = (
                ev.event_id,
                ev.ts,
                ev.user_id,
                ev.item_id,
                ev.label,
                {k: v for k, v in ev.context.items() if v is not None},
            )
        else:
            bad[off] = ev.reason if ev is not None else "empty record"
    return good, bad


def _check(values):
    offsets = list(range(100, 100 + len(values)))
    ev, rej = parse_batch(values, partition=3, offsets=offsets, now_ms=NOW)
    good, bad = _reference(values, offsets)
    core = {"event_id", "ts", "user_id", "item_id", "label", "kafka_partition", "kafka_offset"}
    got = {
        r["kafka_offset"]: (
            r["event_id"],
            r["ts"],
            r["user_id"],
            r["item_id"],
            r["label"],
            {
                k.removeprefix("context_") if k.removeprefix("context_") in core else k: v
                for k, v in r.items()
                if k not in core and v is not None
            },
        )
        for r in ev.to_pylist()
    }
    assert got == good
    reasons = dict(zip(rej["kafka_offset"].to_pylist(), rej["reason"].to_pylist()))
    assert reasons.keys() == bad.keys()
    for off, why in bad.items():
        assert reasons[off].startswith(why), (off, reasons[off], why)
    assert ev["kafka_offset"].to_pylist() == sorted(got)  # offset order
    assert set(ev["kafka_partition"].to_pylist()) <= {3}
    by_off = dict(zip(offsets, values))
    assert all(by_off[o] == v for o, v in zip(rej["kafka_offset"].to_pylist(), rej["value"].to_pylist()))


@pytest.mark.parametrize("seed", range(6))
def test_mixed_batches_match_parse_event_record_by_record(seed):
    rng = random.Random(seed)
    pool = [v for i in range(20) for v in _variants(i)]
    values = [rng.choice(pool) if rng.random() < 0.3 else _variants(rng.randrange(10**6))[0] for _ in range(400)]
    _check(values)


@pytest.mark.parametrize("which", range(len(_variants(0))))
def test_each_variant_inside_a_plain_batch(which):
    plain = [_variants(i)[0] for i in range(50)]
    _check(plain[:25] + [_variants(999)[which]] + plain[25:])


def test_batches_with_flat_context_take_the_vectorised_path(monkeypatch):
    calls = []
    monkeypatch.setattr("pipelines.parse.parse_event", lambda *a, **k: calls.append(1) or parse_event(*a, **k))
    values = [
        json.dumps(dict(OK, event_id=f"c{i}", context={"hour": i % 24, "dev": "web", "w": i / 3})).encode()
        for i in range(500)
    ] + [json.dumps(dict(OK, event_id="plain")).encode()]
    ev, rej = parse_batch(values, partition=0, offsets=list(range(len(values))), now_ms=NOW)
    assert ev.num_rows == 501 and rej.num_rows == 0 and not calls
    assert ev["hour"].to_pylist()[:3] == [0, 1, 2] and ev["dev"][500].as_py() is None
    _check(values)


def test_plain_batches_take_the_vectorised_path(monkeypatch):
    calls = []
    monkeypatch.setattr("pipelines.parse.parse_event", lambda *a, **k: calls.append(1) or parse_event(*a, **k))
    values = [_variants(i)[0] for i in range(1000)] + [json.dumps(dict(OK, label=5)).encode()]
    ev, rej = parse_batch(values, partition=0, offsets=list(range(len(values))), now_ms=NOW)
    assert ev.num_rows == 1000 and rej.num_rows == 1 and len(calls) == 1  # only the bad one, for its reason
    assert rej["reason"][0].as_py() == parse_event(values[-1], now_ms=NOW).reason
    assert pipelines.events.MAX_ID_CHARS == 256  # the fast path mirrors these limits
