"""The scoring service over HTTP, with a real Feast store (SQLite) and a real registry.

- input validation: 4xx with a message for every kind of bad request;
- feedback moves predictions: the compensated score rises, the base score does not;
- a new version promoted while a client scores in a loop: no failed request, the version changes,
  and the new model's memory is rebuilt from the recent outcomes.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
import torch

from jobs.examples import write_example_files
from reloop.datasets import movielens_examples
from jobs.registry import ModelRegistry
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import asgi_app, prepare_feature_store
from jobs.trainer import IncrementalTrainer, TrainerConfig
from reloop.datasets import load_dataset

pytestmark = pytest.mark.integration
N_EVENTS = 3000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Feast store with the features of the first events, and a registry with one trained version."""
    root = tmp_path_factory.mktemp("serve")
    store = prepare_feature_store(str(root / "features"), load_dataset("movielens-100k", limit=N_EVENTS))
    write_example_files(movielens_examples(N_EVENTS), str(root / "examples"), rows_per_file=1000)
    trainer = IncrementalTrainer(TrainerConfig(str(root / "examples"), str(root / "ckpt"), registry_uri=str(root / "reg"),
                                               idle_exit=0, checkpoint_every=N_EVENTS, model_kind="deepfm"))
    trainer.run()
    trainer.publish()
    reg = ModelRegistry(str(root / "reg"))
    reg.promote(reg.versions()[-1])
    return {"root": root, "store": store, "registry": reg, "trainer": trainer}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, scorer: Scorer) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(asgi_app(scorer), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
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


def _scorer(world, **kw) -> Scorer:
    store = world["store"]
    s = Scorer(world["registry"], lambda fs: FeastLookup(store, fs), ScorerConfig(poll_seconds=0.1, **kw))
    s.start()
    return s


@pytest.fixture
def server(world):
    scorer = _scorer(world)
    srv = Server(scorer)
    yield srv, scorer
    srv.stop()
    scorer.close()


def test_binds_loopback_and_scores(server):
    srv, scorer = server
    r = requests.post(f"{srv.url}/score", json={"user_id": "196", "item_id": "242"}, timeout=10)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"request_id", "probability", "base_probability", "model_version"}
    assert 0 < out["base_probability"] < 1 and out["model_version"] == scorer.bundle.version
    # unknown ids are scored (hashed buckets, missing features), not refused
    r = requests.post(f"{srv.url}/score", json={"user_id": "never-seen", "item_id": "nor-this", "context": {"d": 1}})
    assert r.status_code == 200
    assert requests.get(f"{srv.url}/health").json()["model_version"] == scorer.bundle.version
    assert srv.server.config.host == "127.0.0.1"


@pytest.mark.parametrize("path,body,status,needle", [
    ("/score", b"{not json", 400, "not valid JSON"),
    ("/score", b"[1, 2]", 422, "JSON object"),
    ("/score", b'{"user_id": "1"}', 422, "item_id: Field required"),
    ("/score", b'{"user_id": "1", "item_id": "2", "colour": "red"}', 422, "colour: unknown field"),
    ("/score", b'{"user_id": 1, "item_id": "2"}', 422, "user_id"),
    ("/score", b'{"user_id": "", "item_id": "2"}', 422, "user_id"),
    ("/score", b'{"user_id": "1", "item_id": "2", "context": {"x": [1]}}', 422, "context.x"),
    ("/feedback", b'{"request_id": "nope", "label": 1}', 404, "unknown request_id"),
    ("/feedback", b'{"request_id": "x", "label": 3}', 422, "label"),
    ("/feedback", b'{"label": 1}', 422, "request_id"),
    ("/feedback", b'{"request_id": "x", "label": 1, "event": {"user_id": "1", "item_id": "2", "label": 1}}', 422,
     "not both"),
    ("/nowhere", b"{}", 404, "no route"),
    ("/score", b'{"user_id": "' + b"x" * 70_000 + b'"}', 413, "over the limit"),
])
def test_bad_requests_get_4xx_with_a_message(server, path, body, status, needle):
    srv, _ = server
    r = requests.post(f"{srv.url}{path}", data=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    # and the service keeps serving
    assert requests.post(f"{srv.url}/score", json={"user_id": "1", "item_id": "2"}).status_code == 200


def test_no_model_yet_is_503(world, tmp_path):
    empty = ModelRegistry(str(tmp_path / "empty"))
    scorer = Scorer(empty, lambda fs: FeastLookup(world["store"], fs))
    scorer.start()
    srv = Server(scorer)
    try:
        r = requests.post(f"{srv.url}/score", json={"user_id": "1", "item_id": "2"})
        assert r.status_code == 503 and "no model" in r.json()["error"]
    finally:
        srv.stop()
        scorer.close()


def test_feedback_moves_compensated_score_but_not_base(server):
    srv, _ = server
    pairs = [("13", "100"), ("13", "181"), ("13", "258")]  # one user, similar requests

    def score(u, i):
        r = requests.post(f"{srv.url}/score", json={"user_id": u, "item_id": i}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    before = {p: score(*p) for p in pairs}
    for _ in range(40):
        for p in pairs:
            rid = score(*p)["request_id"]
            r = requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 1}, timeout=10)
            assert r.status_code == 200, r.text
    # an event-style outcome (not scored here) is accepted too
    r = requests.post(f"{srv.url}/feedback", json={"event": {"user_id": "13", "item_id": "100", "label": 1}})
    assert r.status_code == 200, r.text
    after = {p: score(*p) for p in pairs}
    for p in pairs:
        assert after[p]["base_probability"] == pytest.approx(before[p]["base_probability"], abs=1e-6)
        assert after[p]["probability"] > before[p]["probability"] + 0.05, (before[p], after[p])
    # a request id is answered once
    rid = score(*pairs[0])["request_id"]
    assert requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 0}).status_code == 200
    assert requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 0}).status_code == 404


def test_without_memory_feedback_changes_nothing(world):
    scorer = _scorer(world, use_memory=False)
    try:
        a = scorer.score("13", "100")
        for _ in range(20):
            scorer.feedback(scorer.score("13", "100")["request_id"], 1)
        b = scorer.score("13", "100")
        assert a["probability"] == pytest.approx(b["probability"]) == pytest.approx(b["base_probability"])
    finally:
        scorer.close()


def test_promotion_while_scoring_in_a_loop_drops_nothing_and_switches_version(world, server):
    srv, scorer = server
    reg = world["registry"]
    old = reg.current()
    # outcomes the new model's memory must be rebuilt from
    for _ in range(30):
        rid = requests.post(f"{srv.url}/score", json={"user_id": "7", "item_id": "50"}).json()["request_id"]
        requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 1})

    seen, failures, stop = [], [], threading.Event()

    def client():
        s = requests.Session()
        while not stop.is_set():
            try:
                r = s.post(f"{srv.url}/score", json={"user_id": "7", "item_id": "50"}, timeout=10)
                if r.status_code != 200:
                    failures.append(r.status_code)
                else:
                    seen.append(r.json()["model_version"])
            except requests.RequestException as e:
                failures.append(repr(e))

    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(0.5)
        # a different model (more training) becomes current while the client is scoring
        model = world["trainer"].model
        with torch.no_grad():
            state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in model.state_dict().items()}
        entry = reg.entry(old)
        new = reg.publish(state, model_config=entry.model_config, feature_service=entry.feature_service,
                          extra=entry.extra, metrics={"auc": 0.0})
        reg.promote(new.version)
        deadline = time.monotonic() + 20
        while (not seen or seen[-1] != new.version) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(timeout=20)
    assert failures == []
    assert seen[0] == old and seen[-1] == new.version
    assert seen.index(new.version) > 0 and old not in seen[seen.index(new.version):]  # switched once, for good
    # the new model's memory was rebuilt from the outcomes: it compensates like the old one did
    out = scorer.score("7", "50")
    assert out["model_version"] == new.version and out["probability"] > out["base_probability"] + 0.05


def test_a_version_that_cannot_load_keeps_the_old_model(world, server):
    srv, scorer = server
    reg = world["registry"]
    old = reg.current()
    entry = reg.entry(old)
    _, weights = reg.load(old)
    bad = reg.publish(weights, model_config=entry.model_config, feature_service="no_such_service",
                      extra=entry.extra)
    reg.promote(bad.version)
    try:
        time.sleep(1.0)
        r = requests.post(f"{srv.url}/score", json={"user_id": "1", "item_id": "2"})
        assert r.status_code == 200 and r.json()["model_version"] == old
        assert "no_such_service" in scorer.health()["last_reload_error"]
    finally:
        reg.promote(old)


def test_rebuild_survives_outcomes_with_mixed_context_types(world):
    scorer = _scorer(world)
    try:
        for v in (1, "one", 2.5, True):
            scorer.feedback(scorer.score("13", "100", {"device": v})["request_id"], 1)
        version = scorer.bundle.version
        scorer.bundle = None  # force a full reload + rebuild from the buffered outcomes
        assert scorer.reload() and scorer.bundle.version == version
        out = scorer.score("13", "100")
        assert out["probability"] > out["base_probability"]
    finally:
        scorer.close()


def test_reloop_score_cli(server):
    from typer.testing import CliRunner

    from reloop.cli import app

    srv, scorer = server
    r = CliRunner().invoke(app, ["score", "196", "242", "-c", "device=web", "--feedback", "1", "--url", srv.url])
    assert r.exit_code == 0, r.output
    assert '"model_version": "%s"' % scorer.bundle.version in r.output and '"written": true' in r.output
    r = CliRunner().invoke(app, ["score", "196", "242", "-c", "novalue", "--url", srv.url])
    assert r.exit_code != 0 and "expected key=value" in r.output


def test_memory_key_kind_sets_the_memory_width_and_bad_kinds_are_refused(world):
    from jobs.scoring import load_bundle
    from online_models.models import memory_key_dim

    reg = world["registry"]
    version = reg.versions()[-1]
    plain = load_bundle(reg, version, {"key": "hidden"})
    keyed = load_bundle(reg, version, {"key": "hidden+user"})
    assert plain.memory.config.dim == plain.model.hidden_dim
    assert keyed.memory.config.dim == memory_key_dim(keyed.model, "hidden+user") > plain.model.hidden_dim
    with pytest.raises(ValueError, match="memory key"):
        load_bundle(reg, version, {"key": "user"})
