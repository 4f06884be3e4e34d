"""Alerts on the real Kafka broker: the alerts topic, and `reloop monitor` end to end
(predictions topic -> monitors -> policy -> alerts topic + audit log + checkpoint)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from jobs.alerts import KafkaHook
from jobs.monitor import run_monitor
from online_models.drift.records import AuditLog, Detection, Request, alert_payload
from pipelines.config import KafkaConfig
from pipelines.kafka_io import end_offsets, ensure_topics, producer, read_range
from reloop.config import ReloopConfig
from reloop.synthetic import generate
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def consume_json(cfg: KafkaConfig, topic: str) -> list[tuple[bytes, dict]]:
    out = []
    for part, end in end_offsets(cfg, topic).items():
        out += [(k, json.loads(v)) for _, k, v in read_range(cfg, topic, part, 0, end)]
    return out


def test_alert_lands_on_the_alerts_topic(kafka_config, unique_topic):
    ensure_topics(kafka_config, [unique_topic], partitions=1)
    hook = KafkaHook(kafka_config, unique_topic)
    d = Detection("page_hinkley:logloss", "logloss", "drift", 101.2, 100.0, 640, 1000, 2000, 12_345, model_version="v7")
    payload = alert_payload(Request("retrain", "2 performance monitors detect drift", (d,), "v7"))
    try:
        res = hook.deliver(payload)
    finally:
        hook.close()
    assert res.ok, res.error
    [(key, body)] = consume_json(kafka_config, unique_topic)
    assert key == b"page_hinkley:logloss"
    assert body == json.loads(json.dumps(payload))
    assert body["type"] == "alert" and body["model_version"] == "v7" and body["statistic"] == 101.2


def test_kafka_hook_with_broker_unreachable_fails_softly():
    hook = KafkaHook(KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}"), "reloop.alerts", send_timeout_s=2)
    t0 = time.monotonic()
    res = hook.deliver({"id": "x"})
    assert not res.ok and res.error and time.monotonic() - t0 < 15, "bounded by send_timeout_s, not 30 s"


def test_reloop_monitor_end_to_end_on_kafka(kafka_config, tmp_path):
    run_id = uuid.uuid4().hex[:10]
    preds, alerts = f"test.preds.{run_id}", f"test.alerts.{run_id}"
    cfg = ReloopConfig.model_validate(
        {
            "kafka": {"bootstrap_servers": kafka_config.bootstrap_servers, "alerts_topic": alerts},
            "hooks": {"kafka_enabled": True, "dead_letter_path": str(tmp_path / "dl.jsonl"), "background": False},
            "drift": {
                "predictions_topic": preds,
                "consumer_group": f"test-monitor-{run_id}",
                "features": ["item_pop"],
                "state_path": str(tmp_path / "state.json"),
                "audit_log_path": str(tmp_path / "audit.jsonl"),
                "checkpoint_every": 5000,
            },
        }
    )
    ensure_topics(kafka_config, [preds, alerts], partitions=1)
    n = 16_000
    s = generate("abrupt_ctr", n=n, seed=9, at=8000)
    rows = s.table.to_pylist()
    prod = producer(kafka_config)
    for i, r in enumerate(rows):
        rec = {
            "event_id": r["event_id"],
            "ts": r["ts"],
            "user_id": r["user_id"],
            "item_id": r["item_id"],
            "p_base": float(s.p_stale[i]),
            "p": float(s.p_stale[i]),
            "label": r["label"],
            "model_version": "v000001",
            "item_pop": r["item_pop"],
        }
        prod.send(preds, key=r["user_id"].encode(), value=json.dumps(rec).encode())
    prod.send(preds, value=b"{broken json")  # a bad record is rejected, never a crash
    prod.flush()
    prod.close()

    seen: list[dict] = []
    stats = run_monitor(cfg, from_beginning=True, idle_timeout_s=5, callbacks=(seen.append,))
    assert stats.records == n and stats.rejected == 1
    assert stats.requests.get("retrain") == 1

    published = [b for _, b in consume_json(kafka_config, alerts)]
    retrain_alerts = [b for b in published if b.get("type") == "alert" and b["action"] == "retrain"]
    assert len(retrain_alerts) == 1
    a = retrain_alerts[0]
    assert a["model_version"] == "v000001" and a["event_time_range"]["end"] >= s.shift_ts
    assert {b["kind"] for b in published if b.get("type") == "audit"} >= {"retrain_requested"}
    assert [b["id"] for b in seen if b.get("type") == "alert"] == [
        b["id"] for b in published if b.get("type") == "alert"
    ]
    # incidents: the hooks get one page per incident and its updates; every raw alert stays in the audit log
    assert (
        [r.kind for r in AuditLog(tmp_path / "audit.jsonl").read()].count("alert")
        >= len([b for b in published if b.get("type") == "alert"])
        >= 1
    )

    # restart: the checkpoint and the committed offsets resume where the first run stopped
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["n"] == n
    again = run_monitor(cfg, from_beginning=True, idle_timeout_s=3)
    assert again.records == 0, "offsets were committed: nothing is processed twice"


def test_reloop_monitor_cli(kafka_config, tmp_path):
    from typer.testing import CliRunner

    from reloop.cli import app

    run_id = uuid.uuid4().hex[:10]
    preds = f"test.preds.{run_id}"
    ensure_topics(kafka_config, [preds], partitions=1)
    prod = producer(kafka_config)
    for i in range(300):
        prod.send(preds, value=json.dumps({"event_id": f"e{i}", "ts": i, "p": 0.1, "label": i % 10 == 0}).encode())
    prod.flush()
    prod.close()
    cfg = tmp_path / "reloop.yaml"
    cfg.write_text(
        json.dumps(
            {  # JSON is YAML
                "kafka": {"bootstrap_servers": kafka_config.bootstrap_servers, "alerts_topic": f"test.alerts.{run_id}"},
                "hooks": {"dead_letter_path": str(tmp_path / "dl.jsonl")},
                "drift": {
                    "predictions_topic": preds,
                    "consumer_group": f"g-{run_id}",
                    "state_path": str(tmp_path / "s.json"),
                    "audit_log_path": str(tmp_path / "a.jsonl"),
                },
            }
        )
    )
    res = CliRunner().invoke(app, ["monitor", "--config", str(cfg), "--from-beginning", "--idle-timeout", "3"])
    assert res.exit_code == 0, res.output
    assert "monitored 300 records (0 rejected)" in res.output
    bad = CliRunner().invoke(app, ["monitor", "--config", str(cfg), "--actions", "json:nope"])
    assert bad.exit_code == 2 and "has no attribute" in bad.output  # an input error: exit code 2 (issue 18)
