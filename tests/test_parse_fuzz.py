"""Seeded fuzzing (Hypothesis, derandomised) of the event parser and the batch parser.

For every generated batch: nothing raises, and the vectorised batch path and the per-record contract
(:func:`pipelines.events.parse_event`) agree on accept/reject for every record, and on the accepted values.
The generator mixes plain events, mutated events (types, ranges, reserved context keys, huge integers),
deep nesting, invalid UTF-8, lone surrogates and random bytes. ``RECORDS`` counts what was generated;
the last test checks the count (and prints it, for the report).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.events import Event, parse_event
from pipelines.parse import _slow_parse, parse_batch

NOW = 1_700_000_000_000
RECORDS = {"n": 0, "accepted": 0, "batches": 0}

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_key = st.one_of(
    st.sampled_from(
        [
            "hour",
            "dev",
            "ts",
            "user_ctr_7d",
            "item_imp_1h",
            "kafka_offset",
            "ctx_a",
            "context_ts",
            "label",
            "user_age",
            "w",
        ]
    ),
    st.text(max_size=6),
)
_context = st.one_of(
    st.none(),
    st.dictionaries(_key, _scalar, max_size=5),
    st.dictionaries(_key, st.recursive(_scalar, lambda c: st.lists(c, max_size=2), max_leaves=3), max_size=3),
    st.integers(),
    st.lists(st.integers(), max_size=2),
)
_id = st.one_of(
    st.text(min_size=0, max_size=8),
    st.integers(min_value=-10, max_value=2**66),
    st.none(),
    st.booleans(),
    st.text(alphabet="ab", min_size=255, max_size=258),
)
_ts = st.one_of(
    st.integers(min_value=1, max_value=NOW + 2 * 86_400_000),
    st.integers(),
    st.floats(),
    st.just(10**30),
    st.text(max_size=3),
)
_label = st.one_of(st.sampled_from([0, 1]), st.sampled_from([0, 1, 2, -1, True, 1.0, None, "1"]))


@st.composite
def _event(draw) -> bytes:
    d = {"event_id": draw(_id), "ts": draw(_ts), "user_id": draw(_id), "item_id": draw(_id), "label": draw(_label)}
    if draw(st.booleans()):  # most records stay plausible so the vectorised path is exercised
        d.update(
            event_id=f"e{draw(st.integers(0, 10**6))}",
            ts=draw(st.integers(1, NOW)),
            user_id=draw(st.sampled_from(["u1", "u2", "196"])),
            item_id="i",
            label=draw(st.sampled_from([0, 1])),
        )
    if draw(st.booleans()):
        d["context"] = draw(_context)
    if draw(st.integers(0, 9)) == 0:
        d.pop(draw(st.sampled_from(sorted(d))))
    if draw(st.integers(0, 9)) == 0:
        d["extra"] = 1
    try:
        raw = json.dumps(d, separators=(",", ":"), allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, OverflowError):
        raw = b"{}"
    return raw


@st.composite
def _hostile(draw) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return b"[" * draw(st.integers(15, 30_000))
    if kind == 1:
        depth = draw(st.integers(14, 40))
        return (
            b'{"event_id":"d","ts":5,"user_id":"u","item_id":"i","label":1,"context":{"a":'
            + b"[" * depth
            + b"1"
            + b"]" * depth
            + b"}}"
        )
    if kind == 2:  # invalid UTF-8 inside a string of a valid-looking event
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return b'{"event_id":"x' + bad + b'","ts":5,"user_id":"u","item_id":"i","label":1}'
    if kind == 3:
        return b'{"event_id":"s\\ud800","ts":5,"user_id":"u","item_id":"i","label":0}'
    if kind == 4:  # brackets inside strings are not nesting
        return (
            b'{"event_id":"b","ts":5,"user_id":"u","item_id":"i","label":0,"context":{"s":"'
            + b"[{" * draw(st.integers(5, 300))
            + b'"}}'
        )
    if kind == 5:
        return b'{"event_id":"q","ts":5,"user_id":"u","item_id":"i","label":0,"context":{"n":1' + b"0" * 30 + b"}}"
    return draw(st.binary(max_size=64))


_record = st.one_of(_event(), _event(), _event(), _hostile(), st.none())


def _accepts(values: list) -> dict[int, tuple]:
    out = {}
    for off, v in enumerate(values):
        ev = parse_event(v, now_ms=NOW) if v is not None else None
        if isinstance(ev, Event):
            try:
                (ev.event_id + ev.user_id + ev.item_id + json.dumps(ev.context, ensure_ascii=False)).encode()
            except UnicodeEncodeError:
                continue
            out[off] = (ev.event_id, ev.ts, ev.user_id, ev.item_id, ev.label)
    return out


@settings(
    max_examples=1500,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_record, min_size=1, max_size=25))
def test_fast_and_slow_paths_agree_with_the_contract(values):
    RECORDS["n"] += len(values)
    RECORDS["batches"] += 1
    offsets = list(range(len(values)))
    ev, rej = parse_batch(values, partition=0, offsets=offsets, now_ms=NOW)
    slow, slow_rej = _slow_parse(values, partition=0, offsets=offsets, keys=[None] * len(values), now_ms=NOW)
    want = _accepts(values)
    got = {r["kafka_offset"]: (r["event_id"], r["ts"], r["user_id"], r["item_id"], r["label"]) for r in ev.to_pylist()}
    got_slow = {
        r["kafka_offset"]: (r["event_id"], r["ts"], r["user_id"], r["item_id"], r["label"]) for r in slow.to_pylist()
    }
    assert got == want == got_slow
    assert sorted(rej["kafka_offset"].to_pylist()) == sorted(set(offsets) - set(want))
    assert sorted(slow_rej["kafka_offset"].to_pylist()) == sorted(set(offsets) - set(want))
    ev.validate(full=True)  # every string is valid UTF-8: nothing downstream can fail decoding
    RECORDS["accepted"] += len(want)


def test_zz_fuzz_count():
    """Runs after the fuzz test (file order): it generated thousands of records."""
    print(
        f"\nfuzz: {RECORDS['n']} records in {RECORDS['batches']} batches, {RECORDS['accepted']} accepted, "
        f"0 disagreements"
    )
    assert RECORDS["n"] >= 3000
