"""Alert hooks against a real local HTTP server: signed delivery, retries with backoff, dead-letter,
and monitoring that carries on while the endpoint is down."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.alerts import (
    SIGNATURE_HEADER,
    DeadLetterLog,
    HookDispatcher,
    HookError,
    PythonHook,
    WebhookHook,
    dispatcher_from_config,
    verify,
)
from jobs.monitor import MonitorLoop, PredictionRecord
from online_models.drift.monitors import MonitorSuite
from online_models.drift.policy import DriftPolicy
from online_models.drift.records import Detection, Request, alert_payload
from reloop.config import ReloopConfig
from reloop.synthetic import generate
from tests.conftest import free_port

SECRET = "test-secret-5e1f"


class Receiver:
    """A real HTTP endpoint on 127.0.0.1 (ephemeral port) that checks X-Reloop-Signature."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.received: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                ok = verify(body, SECRET.encode(), self.headers.get(SIGNATURE_HEADER, ""))
                outer.received.append({"body": json.loads(body), "signature_ok": ok, "headers": dict(self.headers)})
                status = outer.statuses.pop(0) if outer.statuses else (200 if ok else 401)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def sample_request() -> Request:
    d = Detection(
        "adwin:logloss",
        "logloss",
        "drift",
        0.48,
        0.0001,
        812,
        1_767_225_600_000,
        1_767_226_400_000,
        13_000,
        model_version="v000003",
    )
    return Request("retrain", "2 performance monitors detect drift", (d,), "v000003", index=13_000)


def recording_sleep(log: list[float]):
    def sleep(s: float) -> None:
        log.append(s)
        time.sleep(s)

    return sleep


def test_webhook_delivers_signed_json_the_server_verifies(receiver, monkeypatch):
    monkeypatch.setenv("RELOOP_TEST_WEBHOOK_SECRET", SECRET)
    hook = WebhookHook(receiver.url, secret_env="RELOOP_TEST_WEBHOOK_SECRET", timeout_s=2)
    payload = alert_payload(sample_request())
    res = hook.deliver(payload)
    assert res.ok and res.attempts == 1 and res.status == 200
    [got] = receiver.received
    assert got["signature_ok"], "HMAC-SHA256 over the exact body with the secret from the environment"
    body = got["body"]
    for key in (
        "detector",
        "metric",
        "statistic",
        "threshold",
        "window",
        "event_time_range",
        "model_version",
        "summary",
    ):
        assert key in body, key
    assert body["detector"] == "adwin:logloss" and body["model_version"] == "v000003"
    assert body["event_time_range"] == {"start": 1_767_225_600_000, "end": 1_767_226_400_000}
    assert got["headers"]["Content-Type"] == "application/json"


def test_wrong_secret_is_rejected_by_the_receiver_and_not_retried(receiver, tmp_path):
    hook = WebhookHook(receiver.url, secret=b"not-the-secret", retries=3, backoff_s=0.01)
    dl = DeadLetterLog(tmp_path / "dl.jsonl")
    [res] = HookDispatcher([hook], dl).deliver(alert_payload(sample_request()))
    assert not res.ok and res.status == 401 and res.attempts == 1, "a 4xx is final"
    assert receiver.received[0]["signature_ok"] is False
    assert dl.read()[0]["status"] == 401


def test_server_error_is_retried_then_delivered():
    r = Receiver(statuses=[503, 500])
    try:
        waits: list[float] = []
        hook = WebhookHook(r.url, secret=SECRET.encode(), retries=3, backoff_s=0.01, sleep=recording_sleep(waits))
        res = hook.deliver({"id": "x", "detector": "d"})
        assert res.ok and res.attempts == 3 and waits == [0.01, 0.02]
        assert len(r.received) == 3 and all(x["signature_ok"] for x in r.received)
    finally:
        r.close()


def test_endpoint_down_retries_with_backoff_then_dead_letter(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/alerts"  # nothing listens there
    waits: list[float] = []
    hook = WebhookHook(
        url,
        secret=SECRET.encode(),
        timeout_s=1,
        retries=3,
        backoff_s=0.05,
        backoff_max_s=0.15,
        sleep=recording_sleep(waits),
    )
    dl = DeadLetterLog(tmp_path / "alerts.deadletter.jsonl")
    payload = alert_payload(sample_request())
    t0 = time.monotonic()
    [res] = HookDispatcher([hook], dl).deliver(payload)
    assert not res.ok and res.attempts == 4
    assert waits == [0.05, 0.1, 0.15], "exponential backoff, capped at backoff_max_s"
    assert time.monotonic() - t0 >= 0.3
    [line] = dl.read()
    assert line["payload"] == payload and line["attempts"] == 4 and line["target"] == url
    assert "ConnectionRefusedError" in line["error"] or "Connection refused" in line["error"]


def test_timeout_counts_as_a_failed_attempt(tmp_path):
    r = Receiver(delay_s=0.5)
    try:
        hook = WebhookHook(r.url, secret=SECRET.encode(), timeout_s=0.1, retries=1, backoff_s=0.01)
        dl = DeadLetterLog(tmp_path / "dl.jsonl")
        [res] = HookDispatcher([hook], dl).deliver({"id": "t"})
        assert not res.ok and res.attempts == 2 and "timed out" in res.error.lower()
        assert len(dl.read()) == 1
    finally:
        r.close()


def test_monitoring_continues_while_the_webhook_is_down(tmp_path):
    """An abrupt CTR shift with the on-call endpoint down: every alert is retried and dead-lettered,
    the other hooks still get it, and the loop processes every record."""
    url = f"http://127.0.0.1:{free_port()}/alerts"
    waits: list[float] = []
    seen: list[dict] = []
    dl = DeadLetterLog(tmp_path / "dl.jsonl")
    dispatcher = HookDispatcher(
        [
            WebhookHook(url, secret=b"s", retries=2, backoff_s=0.01, sleep=recording_sleep(waits)),
            PythonHook(seen.append),
        ],
        dl,
    )
    suite = MonitorSuite.from_specs(
        [
            {"kind": "adwin", "metric": "logloss", "params": {"delta": 0.0001}},
            {"kind": "page_hinkley", "metric": "logloss", "params": {"threshold": 100.0, "delta": 0.02, "mode": "up"}},
        ]
    )
    loop = MonitorLoop(suite, DriftPolicy(), dispatcher)
    s = generate("abrupt_ctr", n=12_000, seed=4, at=6000)
    y, ts = s.table.column("label").to_numpy(), s.table.column("ts").to_numpy()
    for i in range(12_000):
        loop.process(PredictionRecord(f"e{i}", int(ts[i]), "u", "i", float(s.p_stale[i]), int(y[i]), "v1"))
    assert loop.n == 12_000, "no record lost to a failing hook"
    assert any(r.action == "retrain" for r in loop.requests)
    assert len(seen) == len(loop.requests) >= 1, "the working hook got every alert"
    dead = dl.read()
    assert len(dead) == len(loop.requests) and all(d["attempts"] == 3 for d in dead)
    assert waits == [0.01, 0.02] * len(loop.requests)


def test_background_delivery_never_blocks_the_caller(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/alerts"
    dl = DeadLetterLog(tmp_path / "dl.jsonl")
    d = HookDispatcher([WebhookHook(url, secret=b"s", retries=2, backoff_s=0.2)], dl, background=True)
    t0 = time.monotonic()
    assert d.deliver({"id": "bg"}) is None
    assert time.monotonic() - t0 < 0.1, "queued, not delivered inline"
    assert d.flush(10)
    d.close()
    assert [x["payload"]["id"] for x in dl.read()] == ["bg"]


def test_python_entry_point_hook_and_errors():
    hook = PythonHook("json:dumps")
    assert hook.deliver({"a": 1}).ok
    for spec, msg in [
        ("nodots", "expected 'module:function'"),
        ("no_such_module_x:f", "cannot import"),
        ("json:nope", "has no attribute"),
        ("json:__doc__", "not callable"),
    ]:
        with pytest.raises(HookError, match=msg):
            PythonHook(spec)


def test_missing_secret_env_is_a_clear_setup_error():
    with pytest.raises(HookError, match="RELOOP_NOT_SET_SECRET"):
        WebhookHook("http://127.0.0.1:1/x", secret_env="RELOOP_NOT_SET_SECRET", environ={})
    with pytest.raises(HookError, match="http"):
        WebhookHook("ftp://x")


def test_dispatcher_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RELOOP_TEST_WEBHOOK_SECRET", SECRET)
    cfg = ReloopConfig.model_validate(
        {
            "hooks": {
                "webhooks": [{"url": "http://127.0.0.1:9/a", "secret_env": "RELOOP_TEST_WEBHOOK_SECRET", "retries": 1}],
                "kafka_enabled": False,
                "python": ["json:dumps"],
                "dead_letter_path": str(tmp_path / "dl.jsonl"),
            }
        }
    )
    d = dispatcher_from_config(cfg, background=False)
    assert [h.name for h in d.hooks] == ["webhook:http://127.0.0.1:9/a", "python:json:dumps"]
    assert d.hooks[0].secret == SECRET.encode() and d.hooks[0].retries == 1


# ------------------------------------------------------------------ issue 18: hostile or slow endpoints


class _Endpoint:
    """A real endpoint whose handler is ``handle(request_handler)``."""

    def __init__(self, handle) -> None:
        self.hits: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                outer.hits.append({"method": "POST", "headers": dict(self.headers), "body": self.rfile.read(n)})
                handle(self)

            def do_GET(self):  # noqa: N802
                outer.hits.append({"method": "GET", "headers": dict(self.headers), "body": b""})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_redirect_is_refused_and_the_signature_never_reaches_the_other_host(tmp_path):
    other = _Endpoint(lambda h: (h.send_response(200), h.end_headers()))

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", other.url.replace("127.0.0.1", "localhost"))
        h.end_headers()

    first = _Endpoint(redirect)
    try:
        dl = DeadLetterLog(tmp_path / "dl.jsonl")
        hook = WebhookHook(first.url, secret=SECRET.encode(), timeout_s=2, retries=2, sleep=lambda s: None)
        (res,) = HookDispatcher([hook], dl).deliver({"id": "r1", "detector": "x"})
        assert not res.ok and res.status == 302 and "redirect" in res.error and res.attempts == 1
        assert other.hits == [] and len(first.hits) == 1
        assert dl.read()[0]["payload"]["id"] == "r1"
    finally:
        first.close()
        other.close()


def test_a_trickling_endpoint_is_cut_at_the_deadline_and_does_not_starve_other_hooks(tmp_path):
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(1000):  # one byte every 0.5 s: every socket read succeeds within timeout_s=1
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    slow = _Endpoint(trickle)
    healthy = Receiver()
    try:
        dl = DeadLetterLog(tmp_path / "dl.jsonl")
        slow_hook = WebhookHook(slow.url, secret=SECRET.encode(), timeout_s=1, retries=0)
        t0 = time.monotonic()
        res = slow_hook.deliver({"id": "s0"})
        took = time.monotonic() - t0
        assert not res.ok and took < 2.5, (res, took)  # was 32.5 s with per-read timeouts
        d = HookDispatcher(
            [slow_hook, WebhookHook(healthy.url, secret=SECRET.encode(), timeout_s=1)], dl, background=True
        )
        for i in range(20):
            d.deliver({"id": f"a{i}", "detector": "x"})
        t0 = time.monotonic()
        d.close(timeout_s=5)
        assert time.monotonic() - t0 < 8
        assert len(healthy.received) == 20  # the healthy hook got all 20
        dead = {r["payload"]["id"] for r in dl.read() if r["hook"] == slow_hook.name}
        # every alert the slow hook could not deliver is in the dead-letter log: none vanished
        assert {f"a{i}" for i in range(20)} <= dead, dead
    finally:
        slow.close()
        healthy.close()


def test_a_webhook_without_a_secret_is_warned_about(caplog):
    with caplog.at_level("WARNING"):
        WebhookHook("http://127.0.0.1:9/x")
    assert any("no secret" in r.getMessage() for r in caplog.records)
