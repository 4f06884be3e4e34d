"""Issue 18, services rows, against the real local services: Redis needs its generated password (and
FLUSHALL is gone), the test broker never auto-creates topics, embedded Ray listens on loopback only and
exports no metrics."""

from __future__ import annotations

import socket
import time

import pytest

pytestmark = pytest.mark.integration


def _redis(cmds: bytes) -> bytes:
    from reloop import services

    with socket.create_connection(("127.0.0.1", services.REDIS_PORT), timeout=2) as s:
        s.sendall(cmds)
        time.sleep(0.2)
        return s.recv(4096)


def test_redis_requires_the_generated_password_and_flushall_is_disabled(redis_url):
    from reloop import services

    r = services.get("redis")
    assert r.password_file.exists() and oct(r.password_file.stat().st_mode)[-3:] == "600"
    assert "password=" in redis_url
    assert _redis(b"PING\r\n").startswith(b"-NOAUTH")
    assert _redis(b"SET k v\r\n").startswith(b"-NOAUTH")
    out = _redis(f"AUTH {r.password()}\r\nPING\r\nFLUSHALL\r\n".encode())
    assert b"+PONG" in out and b"unknown command" in out.lower()
    assert r.password() not in " ".join(r.command())  # never on the command line (ps shows it)


def test_feast_takes_the_redis_password_from_the_env_field(tmp_path, monkeypatch, redis_url):
    from pipelines.config import FeastConfig
    from pipelines.feast_io import redis_connection_string
    from reloop import services

    monkeypatch.setenv("MY_REDIS_PW", "from-env")
    cfg = FeastConfig(profile="redis", redis_connection_string="127.0.0.1:1", redis_password_env="MY_REDIS_PW")
    assert redis_connection_string(cfg) == "127.0.0.1:1,password=from-env"
    monkeypatch.delenv("MY_REDIS_PW")
    with pytest.raises(ValueError, match="MY_REDIS_PW"):
        redis_connection_string(cfg)
    local = FeastConfig(profile="redis", redis_connection_string=services.REDIS_URL)
    assert redis_connection_string(local) == services.get("redis").connection_string()


def test_the_test_broker_does_not_auto_create_topics(kafka_config, unique_topic):
    from kafka.errors import KafkaTimeoutError

    from pipelines.kafka_io import end_offsets, producer
    from reloop import services

    assert "auto.create.topics.enable=false" in services.get("kafka").props.read_text()
    prod = producer(kafka_config, max_block_ms=3000)
    with pytest.raises(KafkaTimeoutError):
        prod.send(unique_topic, b"x").get(timeout=5)
    prod.close()
    assert end_offsets(kafka_config, unique_topic) == {}


def test_embedded_ray_exports_no_metrics_and_no_agent_listens_on_all_ipv4_interfaces():
    import psutil
    import ray

    from jobs.ray_local import init_local

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    # only what Ray starts is under test: a session fixture may already run the Flink job server here,
    # whose job and artifact ports Beam binds on every interface (see services.Flink)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    init_local(num_cpus=1, log_to_driver=False)
    try:
        node = ray._private.worker.global_worker.node
        assert node.node_ip_address == "127.0.0.1"
        assert node.metrics_export_port in (None, -1, 0) or node.address_info.get("metrics_export_port") == -1
        pids = {p.pid for p in psutil.Process().children(recursive=True)} - before
        listening = [
            (psutil.Process(c.pid).name(), c.laddr.ip)
            for c in psutil.net_connections(kind="inet")
            if c.status == "LISTEN" and c.pid in pids
        ]
        assert len(listening) >= 3  # GCS, raylet, agents...
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening
    finally:
        ray.shutdown()
