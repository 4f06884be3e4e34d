"""Contract v2: impressions and feedback validate like v1 (a reason for every bad record, nothing raises),
agree with their published JSON Schemas, and v1 labelled events read as impression + immediate feedback."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pipelines.events import (
    FEEDBACK_SCHEMA_V2,
    IMPRESSION_SCHEMA_V2,
    MAX_PAYLOAD_BYTES,
    SCHEMAS,
    Event,
    Feedback,
    Impression,
    Rejection,
    parse_feedback,
    parse_impression,
    parse_impression_or_v1,
    split_v1,
)

NOW = 1_700_000_000_000
DROP = object()
IMP = {
    "impression_id": "imp-1",
    "ts": 881_250_949_000,
    "user_id": "196",
    "item_id": "242",
    "request_id": "r1",
    "position": 3,
    "context": {"device": "web", "hour": 13},
}
FB = {"impression_id": "imp-1", "ts": 881_250_959_000, "kind": "click", "value": 1.0}


def rec(base: dict, **changes) -> bytes:
    d = {**base, **changes}
    return json.dumps({k: v for k, v in d.items() if v is not DROP}).encode()


def test_good_records_round_trip_and_match_their_schemas():
    imp = parse_impression(rec(IMP), now_ms=NOW)
    assert isinstance(imp, Impression) and imp.position == 3 and imp.context["device"] == "web"
    assert parse_impression(imp.to_json(), now_ms=NOW) == imp
    fb = parse_feedback(rec(FB), now_ms=NOW)
    assert fb == Feedback("imp-1", FB["ts"], "click", 1.0)
    assert parse_feedback(fb.to_json(), now_ms=NOW) == fb
    jsonschema.validate(json.loads(rec(IMP)), IMPRESSION_SCHEMA_V2)
    jsonschema.validate(json.loads(rec(FB)), FEEDBACK_SCHEMA_V2)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"].endswith("/v2.json")


def test_optional_fields_may_be_absent():
    imp = parse_impression(rec(IMP, request_id=DROP, position=DROP, context=DROP, user_id=196), now_ms=NOW)
    assert (imp.user_id, imp.request_id, imp.position, imp.context) == ("196", None, None, {})
    assert parse_feedback(rec(FB, value=DROP), now_ms=NOW).value is None


BAD_IMPRESSIONS = {
    "malformed JSON": b'{"impression_id": ',
    "not a JSON object": b"[1]",
    "malformed JSON (utf-8)": b'{"impression_id": "\xff"}',
    "empty record": None,
    "missing field(s): impression_id": rec(IMP, impression_id=DROP),
    "missing field(s): ts": rec(IMP, ts=DROP),
    "unknown field(s): label": rec(IMP, label=1),
    "impression_id: must be": rec(IMP, impression_id=""),
    "user_id: must be": rec(IMP, user_id=None),
    "item_id: must be": rec(IMP, item_id=["x"]),
    "request_id: must be": rec(IMP, request_id=True),
    "ts: must be an integer": rec(IMP, ts="yesterday"),
    "ts: must be positive": rec(IMP, ts=-1),
    "in the far future": rec(IMP, ts=NOW + 10 * 86_400_000),
    "position: must be": rec(IMP, position=-2),
    "position: must be ": rec(IMP, position=1.5),
    "context: must be an object": rec(IMP, context=[1]),
    "context.x: must be": rec(IMP, context={"x": {"deep": 1}}),
    "oversized payload": rec(IMP, context={"pad": "x" * (MAX_PAYLOAD_BYTES + 10)}),
    "invalid unicode": b'{"impression_id": "\\ud800", "ts": 5, "user_id": "u", "item_id": "i"}',
}
BAD_FEEDBACK = {
    "malformed JSON": b"{{",
    "not a JSON object": b'"click"',
    "missing field(s): impression_id": rec(FB, impression_id=DROP),
    "missing field(s): kind": rec(FB, kind=DROP),
    "unknown field(s): label": rec(FB, label=1),
    "impression_id: must be": rec(FB, impression_id=None),
    "kind: must be one of": rec(FB, kind="like"),
    "kind: must be one of ": rec(FB, kind=1),
    "value: must be a finite": rec(FB, value="1"),
    "ts: must be an integer": rec(FB, ts=1.5),
    "in the far future": rec(FB, ts=NOW + 10 * 86_400_000),
    "deep nesting": b'{"impression_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("why,raw", BAD_IMPRESSIONS.items(), ids=list(BAD_IMPRESSIONS))
def test_bad_impressions_are_rejected_with_a_reason(why, raw):
    got = parse_impression(raw, now_ms=NOW)
    assert isinstance(got, Rejection), got
    if why == "malformed JSON (utf-8)":  # with the shared strict decoder: "invalid UTF-8"
        assert got.reason.startswith(("malformed JSON", "invalid UTF-8")), got.reason
    else:
        assert why.strip() in got.reason, got.reason
    assert got.raw == (raw or b"")


@pytest.mark.parametrize("why,raw", BAD_FEEDBACK.items(), ids=list(BAD_FEEDBACK))
def test_bad_feedback_is_rejected_with_a_reason(why, raw):
    got = parse_feedback(raw, now_ms=NOW)
    assert isinstance(got, Rejection), got
    assert why == "deep nesting" or why.strip() in got.reason, got.reason


def test_the_schemas_reject_what_the_parsers_reject():
    """Every bad record that is a JSON object and within the size limit also fails its JSON Schema
    (the far-future check depends on the wall clock and unicode on the transport: parser only)."""
    for table, schema in ((BAD_IMPRESSIONS, IMPRESSION_SCHEMA_V2), (BAD_FEEDBACK, FEEDBACK_SCHEMA_V2)):
        for why, raw in table.items():
            if why in ("in the far future", "invalid unicode", "oversized payload", "deep nesting") or raw is None:
                continue
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if isinstance(d, dict):
                assert not jsonschema.Draft202012Validator(schema).is_valid(d), why


def test_configured_conversion_kinds():
    assert parse_feedback(rec(FB, kind="purchase"), kinds=("click", "purchase")).kind == "purchase"


def test_v1_labelled_events_are_an_impression_with_immediate_feedback():
    v1 = b'{"event_id": "e7", "ts": 10, "user_id": "u", "item_id": "i", "label": 1, "context": {"h": 1}}'
    imp, fb = parse_impression_or_v1(v1, now_ms=NOW)
    assert imp == Impression("e7", 10, "u", "i", context={"h": 1})
    assert fb == Feedback("e7", 10, "click")
    imp, fb = parse_impression_or_v1(v1.replace(b'"label": 1', b'"label": 0'), now_ms=NOW)
    assert fb is None and imp.impression_id == "e7"
    assert parse_impression_or_v1(rec(IMP), now_ms=NOW)[0].impression_id == "imp-1"
    bad = parse_impression_or_v1(v1.replace(b'"label": 1', b'"label": 3'), now_ms=NOW)
    assert isinstance(bad, Rejection) and bad.reason.startswith("label")
    assert split_v1(Event("e", 1, "u", "i", 0)) == (Impression("e", 1, "u", "i"), None)
