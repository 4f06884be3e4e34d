"""The event contract: every kind of bad record is rejected with a reason; nothing raises."""

from __future__ import annotations

import json

import pytest

from pipelines.events import MAX_PAYLOAD_BYTES, Event, Rejection, parse_event

NOW = 1_700_000_000_000
GOOD = {
    "event_id": "e1",
    "ts": 881_250_949_000,
    "user_id": "196",
    "item_id": "242",
    "label": 1,
    "context": {"hour": 13, "device": "web", "price": 9.5, "promo": None},
}


def raw(**changes) -> bytes:
    d = {**GOOD, **changes}
    return json.dumps({k: v for k, v in d.items() if v is not DROP}).encode()


DROP = object()


def test_good_event_round_trips():
    ev = parse_event(raw(), now_ms=NOW)
    assert isinstance(ev, Event) and ev.label == 1 and ev.context["device"] == "web"
    assert parse_event(ev.to_json(), now_ms=NOW) == ev


def test_integer_ids_become_strings_and_context_is_optional():
    ev = parse_event(raw(user_id=196, item_id=242, context=DROP), now_ms=NOW)
    assert (ev.user_id, ev.item_id, ev.context) == ("196", "242", {})


BAD = {
    "malformed JSON": b'{"event_id": "e1", "ts": ',
    "not an object": b"[1, 2, 3]",
    "invalid utf-8": b'{"event_id": "\xff\xfe"}',
    "empty": b"",
    "missing user_id": raw(user_id=DROP),
    "missing label": raw(label=DROP),
    "missing ts": raw(ts=DROP),
    "unknown field": raw(rating=5),
    "ts as string": raw(ts="881250949000"),
    "ts as float": raw(ts=881250949000.5),
    "ts as bool": raw(ts=True),
    "negative ts": raw(ts=-5),
    "zero ts": raw(ts=0),
    "far-future ts": raw(ts=NOW + 400 * 24 * 3600 * 1000),
    "year 3000 ts": raw(ts=32_503_680_000_000),
    "label 2": raw(label=2),
    "label -1": raw(label=-1),
    "label as string": raw(label="1"),
    "label as bool": raw(label=True),
    "label as float": raw(label=1.0),
    "label null": raw(label=None),
    "user_id empty": raw(user_id=""),
    "user_id list": raw(user_id=[1]),
    "user_id null": raw(user_id=None),
    "item_id float": raw(item_id=3.5),
    "item_id too long": raw(item_id="x" * 1000),
    "event_id object": raw(event_id={"a": 1}),
    "context not object": raw(context=[1, 2]),
    "context nested": raw(context={"a": {"b": 1}}),
    "context too many fields": raw(context={f"f{i}": i for i in range(100)}),
    "oversized payload": raw(context={"blob": "x" * 1000}) + b" " * MAX_PAYLOAD_BYTES,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_are_rejected_with_a_reason(case):
    result = parse_event(BAD[case], now_ms=NOW)
    assert isinstance(result, Rejection), case
    assert result.reason and isinstance(result.reason, str)
    assert result.raw == BAD[case]
    assert not result


def test_reasons_name_the_problem():
    assert parse_event(raw(user_id=DROP), now_ms=NOW).reason == "missing field(s): user_id"
    assert "far future" in parse_event(raw(ts=NOW + 10**12), now_ms=NOW).reason
    assert parse_event(raw(ts=-5), now_ms=NOW).reason.startswith("ts: must be positive")
    assert parse_event(BAD["oversized payload"], now_ms=NOW).reason.startswith("oversized payload")
    assert parse_event(raw(rating=5), now_ms=NOW).reason == "unknown field(s): rating"


def test_never_raises_on_random_bytes():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(0, 200)
        blob = bytes(rng.getrandbits(8) for _ in range(n))
        assert isinstance(parse_event(blob, now_ms=NOW), (Event, Rejection))
    # and on JSON of every shape
    for value in (None, 1, "s", [], {}, {"ts": None}, {k: None for k in GOOD}):
        assert isinstance(parse_event(json.dumps(value), now_ms=NOW), Rejection)
