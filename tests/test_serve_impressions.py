"""The scoring service's impression log against the real broker and the feature job's real join.

- a slate is scored over HTTP, some candidates get clicks, some a label 0, some nothing; the service
  publishes v2 impressions and clicks; ``run_join_once`` (FnApiRunner) joins them with a 2 s attribution
  window: the examples carry exactly the clicks given, and every other candidate is a negative once
  the window has closed; positions are the served ranks;
- with the broker unreachable, ``/score`` and ``/feedback`` keep answering at their usual speed, and
  ``GET /health`` shows the dropped records and the error.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.impression_log import ImpressionLog, ImpressionLogConfig
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import asgi_app
from tests.conftest import free_port
from tests.test_feature_job_integration import job_config, read_examples
from tests.test_serve import world  # noqa: F401  (the module fixture: a Feast store and a trained model)

pytestmark = pytest.mark.integration
WINDOW_S = 2.0


class Server:
    """uvicorn in a thread on a free loopback port, with an impression log."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def scorer(world):  # noqa: F811
    store = world["store"]
    s = Scorer(world["registry"], lambda fs: FeastLookup(store, fs), ScorerConfig(poll_seconds=0.1))
    s.start()
    yield s
    s.close()


def v2_job(tmp_path, kafka_config, topic):
    """A feature-job config with its own v2 topics (one partition each) and a short attribution window."""
    cfg = job_config(tmp_path, kafka_config, topic, attribution_window_s=WINDOW_S)
    k = cfg.kafka.model_copy(
        update={"impressions_topic": f"{topic}.imp", "feedback_topic": f"{topic}.fb", "partitions": 1}
    )
    return cfg.model_copy(update={"kafka": k})


def drain(cfg):
    from pipelines.feature_job import run_join_once

    runs = []
    while (s := run_join_once(cfg, repo_path=cfg.feast.repo_path)).committed:
        runs.append(s)
    return runs


def test_served_impressions_and_clicks_join_into_exactly_the_given_labels(tmp_path, kafka_config, unique_topic, scorer):
    cfg = v2_job(tmp_path, kafka_config, unique_topic)
    log = ImpressionLog(cfg.kafka, ImpressionLogConfig(cfg.kafka.impressions_topic, cfg.kafka.feedback_topic))
    srv = Server(asgi_app(scorer, guard=FeedbackGuard(GuardConfig()), impressions=log))
    try:
        s = requests.Session()
        items = [str(i) for i in (100, 181, 258, 50, 1, 7, 242, 302, 377, 51)]
        out = s.post(
            f"{srv.url}/score",
            json={"user_id": "13", "candidates": items, "context": {"device": "web"}, "request_id": "slate-1"},
        ).json()
        ranking = out["ranking"]
        clicked = {ranking[1]["impression_id"], ranking[4]["impression_id"], ranking[9]["impression_id"]}
        said_no = {ranking[0]["impression_id"], ranking[5]["impression_id"]}
        for iid in clicked | said_no:
            r = s.post(f"{srv.url}/feedback", json={"impression_id": iid, "label": int(iid in clicked)})
            assert r.status_code == 200 and r.json()["written"], r.text
        # refused outcomes publish nothing: a repeat, an unknown impression
        assert s.post(f"{srv.url}/feedback", json={"impression_id": next(iter(clicked)), "label": 1}).json()[
            "duplicate"
        ]
        assert s.post(f"{srv.url}/feedback", json={"impression_id": "nope", "label": 1}).status_code == 404
        # after the window: one more request and its click move both topics' event time past slate 1's window
        time.sleep(WINDOW_S + 0.5)
        one = s.post(f"{srv.url}/score", json={"user_id": "7", "item_id": "50"}).json()
        assert s.post(f"{srv.url}/feedback", json={"impression_id": one["impression_id"], "label": 1}).json()["written"]
        assert log.flush(30)
        health = s.get(f"{srv.url}/health").json()["impression_log"]
        assert health["impressions_sent"] == 11 and health["feedback_sent"] == 4, health
        assert health["failed"] == health["dropped"] == health["invalid"] == 0, health
        assert health["negatives_not_logged"] == 2 and health["producer_created"]
    finally:
        srv.stop()
        log.close()

    runs = drain(cfg)
    assert runs and sum(r.dead_lettered for r in runs) == 0
    ex = read_examples(cfg).set_index("impression_id")
    served = {r["impression_id"]: pos for pos, r in enumerate(ranking)}
    assert set(served) <= set(ex.index) and ex.index.is_unique
    got = ex.loc[list(served)]
    assert {i for i, y in got.label.items() if y == 1} == clicked  # exactly the clicks given
    assert (got.label == 0).sum() == len(items) - len(clicked)  # every other candidate a negative
    assert got.position.to_dict() == served  # the served ranks
    assert set(got.request_id) == {"slate-1"} and set(got.user_id) == {"13"}
    assert set(got.item_id) == set(items)
    neg = got[got.label == 0]
    assert ((neg.label_ts - neg.ts) == int(WINDOW_S * 1000)).all()  # negatives at window close
    pos = got[got.label == 1]
    assert ((pos.label_ts >= pos.ts) & (pos.label_ts <= pos.ts + WINDOW_S * 1000)).all()
    assert ex.loc[one["impression_id"], "label"] == 1  # the later click, joined at once


def test_the_service_keeps_answering_when_kafka_is_down(scorer):
    from pipelines.config import KafkaConfig

    dead = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}")  # nothing listens there
    log = ImpressionLog(dead, ImpressionLogConfig("x.imp", "x.fb", max_queued=50, max_block_ms=500, retry_s=0.2))
    srv = Server(
        asgi_app(scorer, guard=FeedbackGuard(GuardConfig(max_per_pair=1000, max_per_user=1000)), impressions=log)
    )
    try:
        s = requests.Session()
        slowest = 0.0
        for _k in range(30):
            t0 = time.perf_counter()
            r = s.post(f"{srv.url}/score", json={"user_id": "13", "candidates": [str(i) for i in range(1, 11)]})
            assert r.status_code == 200, r.text
            fb = s.post(
                f"{srv.url}/feedback", json={"impression_id": r.json()["ranking"][0]["impression_id"], "label": 1}
            )
            assert fb.status_code == 200 and fb.json()["written"], fb.text
            slowest = max(slowest, time.perf_counter() - t0)
        deadline = time.monotonic() + 10
        while (h := s.get(f"{srv.url}/health").json())["impression_log"]["connect_failures"] < 1:
            assert time.monotonic() < deadline, h  # the sender's first attempt gives up after max_block_ms
            time.sleep(0.1)
        assert h["model_version"] is not None
        il = h["impression_log"]
        assert not il["producer_created"] and il["last_error"] and "producer" in il["last_error"]
        assert il["queued"] <= 50 and il["dropped"] >= 30 * 11 - 50, il
        assert il["impressions_sent"] == il["feedback_sent"] == 0
        assert slowest < 1.0, slowest  # a request never waits for the broker (max_block_ms is 0.5 s alone)
    finally:
        srv.stop()
        log.close(timeout=1)
