"""Issue 14's bad slate requests, each a clear 4xx over HTTP and never a crash (the service keeps serving):
an empty slate, 1,001 and 10,001 candidates, the same item twice, feedback on an unknown impression,
lone surrogates that no v2 record could carry. The logged impressions of a good slate are valid v2."""

from __future__ import annotations

import json

import pytest
import requests

from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.impression_log import ImpressionLog, ImpressionLogConfig
from jobs.serve import asgi_app, handle
from pipelines.events import parse_feedback, parse_impression
from tests.test_serve import world  # noqa: F401  (the module fixture: a Feast store and a trained model)
from tests.test_serve_impressions import Server, scorer  # noqa: F401

pytestmark = pytest.mark.integration


def _ids(n: int) -> bytes:
    return b",".join(b'"%d"' % i for i in range(n))


@pytest.fixture
def server(scorer):  # noqa: F811
    srv = Server(asgi_app(scorer, guard=FeedbackGuard(GuardConfig())))
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"user_id": "1", "candidates": []}', 422, "candidates"),
        (b'{"user_id": "1", "candidates": [' + _ids(1001) + b"]}", 422, "at most 1000"),
        (b'{"user_id": "1", "candidates": [' + _ids(10_001) + b"]}", 413, "over the limit"),
        (b'{"user_id": "1", "candidates": ["5", "6", "5"]}', 422, "item '5' appears 2 times"),
        (b'{"user_id": "1", "candidates": ["5", ""]}', 422, "1 to 256 characters"),
        (b'{"user_id": "1", "candidates": ["5", 6]}', 422, "candidates.1"),
        (b'{"user_id": "1", "candidates": "5"}', 422, "candidates"),
        (b'{"user_id": "\\ud800", "candidates": ["5"]}', 422, "valid string"),
        (b'{"user_id": "1", "candidates": ["\\udfff"]}', 422, "lone surrogate"),
        (b'{"user_id": "1", "item_id": "2", "context": {"d": "\\ud800"}}', 422, "lone surrogate"),
        (b'{"user_id": "1", "item_id": "2", "request_id": "\\ud800"}', 422, "valid string"),
        (b'{"user_id": "1", "item_id": "2", "context": {"\\ud800": 1}}', 422, "lone surrogate"),
    ],
)
def test_bad_slates_get_a_clear_4xx(server, body, status, needle):
    r = requests.post(f"{server.url}/score", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.json()
    assert requests.post(f"{server.url}/score", json={"user_id": "1", "candidates": ["2", "3"]}).status_code == 200


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"impression_id": "never-issued", "label": 1}', 404, "unknown impression"),
        (b'{"impression_id": "\\ud800", "label": 1}', 422, "valid string"),
        (b'{"impression_id": "x", "label": 1, "kind": "click"}', 422, "kind: unknown field"),
    ],
)
def test_bad_feedback_gets_a_clear_4xx(server, body, status, needle):
    r = requests.post(f"{server.url}/feedback", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_a_full_slate_of_distinct_items_is_scored_and_its_records_are_valid_v2(scorer):  # noqa: F811
    """Records as the log encodes them (without a broker: the sender thread is not started) pass the
    feature job's parsers, for the largest slate and a context of every value type."""
    log = ImpressionLog(None, ImpressionLogConfig("i", "f"), start=False)
    guard = FeedbackGuard(GuardConfig())
    items = [f"item-{i}" for i in range(1000)]
    ctx = {"device": "web", "hour": 13, "score": 0.5, "new": True}
    status, out = handle(
        scorer,
        "POST",
        "/score",
        json.dumps({"user_id": "13", "candidates": items, "context": ctx}).encode(),
        guard,
        "",
        log,
    )
    assert status == 200 and len(out["ranking"]) == 1000
    status, fb = handle(
        scorer,
        "POST",
        "/feedback",
        json.dumps({"impression_id": out["ranking"][3]["impression_id"], "label": 1}).encode(),
        guard,
        "",
        log,
    )
    assert status == 200 and fb["written"]
    entries = list(log._queue)
    assert [e[0] for e in entries] == ["imp", "fb"]
    records = [r for e in entries for r in log._records(e)]
    assert len(records) == 1001 and log.stats["invalid"] == 0
    imps = [parse_impression(v) for t, _, v, _ in records if t == "i"]
    assert [i.position for i in imps] == list(range(1000))
    assert [i.item_id for i in imps] == [r["item_id"] for r in out["ranking"]]
    assert all(i.context == ctx and i.request_id == out["request_id"] and i.user_id == "13" for i in imps)
    (fbrec,) = [parse_feedback(v) for t, _, v, _ in records if t == "f"]
    assert fbrec.impression_id == out["ranking"][3]["impression_id"] and fbrec.kind == "click"
    assert fbrec.ts >= imps[0].ts
