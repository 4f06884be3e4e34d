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
from jobs.registry import ModelRegistry
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import asgi_app, prepare_feature_store
from jobs.trainer import IncrementalTrainer, TrainerConfig
from reloop.datasets import load_dataset, movielens_examples

pytestmark = pytest.mark.integration
N_EVENTS = 3000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Feast store with the features of the first events, and a registry with one trained version."""
    root = tmp_path_factory.mktemp("serve")
    store = prepare_feature_store(str(root / "features"), load_dataset("movielens-100k", limit=N_EVENTS))
    write_example_files(movielens_examples(N_EVENTS), str(root / "examples"), rows_per_file=1000)
    trainer = IncrementalTrainer(
        TrainerConfig(
            str(root / "examples"),
            str(root / "ckpt"),
            registry_uri=str(root / "reg"),
            idle_exit=0,
            checkpoint_every=N_EVENTS,
            model_kind="deepfm",
        )
    )
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

    def __init__(self, scorer: Scorer, token: str | None = None, guard=None) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                asgi_app(scorer, token, guard), host="127.0.0.1", port=self.port, log_level="warning", access_log=False
            )
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


def _scorer(world, **kw) -> Scorer:
    store = world["store"]
    s = Scorer(world["registry"], lambda fs: FeastLookup(store, fs), ScorerConfig(poll_seconds=0.1, **kw))
    s.start()
    return s


@pytest.fixture
def server(world):
    from jobs.feedback import FeedbackGuard, GuardConfig

    scorer = _scorer(world)
    # these tests teach the memory on purpose: caps far above the production defaults
    srv = Server(scorer, guard=FeedbackGuard(GuardConfig(max_per_pair=10_000, max_per_user=10_000)))
    yield srv, scorer
    srv.stop()
    scorer.close()


def test_binds_loopback_and_scores(server):
    srv, scorer = server
    r = requests.post(f"{srv.url}/score", json={"user_id": "196", "item_id": "242"}, timeout=10)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"request_id", "impression_id", "probability", "base_probability", "model_version"}
    assert 0 < out["base_probability"] < 1 and out["model_version"] == scorer.bundle.version
    # unknown ids are scored (hashed buckets, missing features), not refused
    r = requests.post(f"{srv.url}/score", json={"user_id": "never-seen", "item_id": "nor-this", "context": {"d": 1}})
    assert r.status_code == 200
    assert requests.get(f"{srv.url}/health").json()["model_version"] == scorer.bundle.version
    assert srv.server.config.host == "127.0.0.1"


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/score", b"{not json", 400, "not valid JSON"),
        ("/score", b"[1, 2]", 422, "JSON object"),
        ("/score", b'{"user_id": "1"}', 422, "either item_id"),
        ("/score", b'{"user_id": "1", "item_id": "2", "colour": "red"}', 422, "colour: unknown field"),
        ("/score", b'{"user_id": 1, "item_id": "2"}', 422, "user_id"),
        ("/score", b'{"user_id": "", "item_id": "2"}', 422, "user_id"),
        ("/score", b'{"user_id": "1", "item_id": "2", "context": {"x": [1]}}', 422, "context.x"),
        ("/feedback", b'{"request_id": "nope", "label": 1}', 404, "unknown request_id"),
        ("/feedback", b'{"impression_id": "nope", "label": 1}', 404, "unknown impression"),
        ("/feedback", b'{"request_id": "x", "label": 3}', 422, "label"),
        ("/feedback", b'{"label": 1}', 422, "impression_id"),
        ("/feedback", b'{"event": {"user_id": "1", "item_id": "2", "label": 1}}', 422, "issued by /score"),
        # issue 18's HTTP 500s, now 4xx: a 60 KB nested body, an int beyond int64, a string in a numeric feature
        (
            "/score",
            b'{"user_id": "1", "item_id": "2", "context": {"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}",
            400,
            "too deeply nested",
        ),
        (
            "/score",
            b'{"user_id": "1", "item_id": "2", "context": {"n": 1000000000000000000000000000000}}',
            422,
            "int64",
        ),
        ("/score", b'{"user_id": "1", "item_id": "2", "context": {"user_ctr_7d": "high"}}', 422, "pipeline column"),
        ("/score", b'{"user_id": "1", "item_id": "2", "context": {"user_ctr_7d": 0.99}}', 422, "pipeline column"),
        ("/score", b'{"user_id": "1", "item_id": "2", "candidates": ["3"]}', 422, "not both"),
        (
            "/score",
            b'{"user_id": "1", "candidates": [' + b",".join(b'"%d"' % i for i in range(1001)) + b"]}",
            422,
            "candidates",
        ),
        ("/score", b'{"user_id": "1", "candidates": []}', 422, "candidates"),
        ("/nowhere", b"{}", 404, "no route"),
        ("/score", b'{"user_id": "' + b"x" * 70_000 + b'"}', 413, "over the limit"),
    ],
)
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
    # an event-style outcome (not scored here) is refused: outcomes must name an issued impression
    r = requests.post(f"{srv.url}/feedback", json={"event": {"user_id": "13", "item_id": "100", "label": 1}})
    assert r.status_code == 422, r.text
    after = {p: score(*p) for p in pairs}
    for p in pairs:
        assert after[p]["base_probability"] == pytest.approx(before[p]["base_probability"], abs=1e-6)
        assert after[p]["probability"] > before[p]["probability"] + 0.05, (before[p], after[p])
    # a request id is answered once
    rid = score(*pairs[0])["request_id"]
    assert requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 0}).json()["written"] is True
    again = requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 0})  # idempotent by id
    assert again.status_code == 200 and again.json() == {"written": False, "duplicate": True}
    assert requests.post(f"{srv.url}/feedback", json={"request_id": rid, "label": 1}).status_code == 409


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
            state = {
                k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()
            }
        entry = reg.entry(old)
        new = reg.publish(
            state,
            model_config=entry.model_config,
            feature_service=entry.feature_service,
            extra=entry.extra,
            metrics={"auc": 0.0},
        )
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
    assert seen.index(new.version) > 0 and old not in seen[seen.index(new.version) :]  # switched once, for good
    # the new model's memory was rebuilt from the outcomes: it compensates like the old one did
    out = scorer.score("7", "50")
    assert out["model_version"] == new.version and out["probability"] > out["base_probability"] + 0.05


def test_a_version_that_cannot_load_keeps_the_old_model(world, server):
    srv, scorer = server
    reg = world["registry"]
    old = reg.current()
    entry = reg.entry(old)
    _, weights = reg.load(old)
    bad = reg.publish(weights, model_config=entry.model_config, feature_service="no_such_service", extra=entry.extra)
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
    assert f'"model_version": "{scorer.bundle.version}"' in r.output and '"written": true' in r.output
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


# ------------------------------------------------------------------ issue 18: hostile clients


def _guarded(world, **guard):
    from jobs.feedback import FeedbackGuard, GuardConfig

    alerts: list[dict] = []
    scorer = _scorer(world)
    g = FeedbackGuard(GuardConfig(**guard), alert=alerts.append)
    return scorer, g, alerts


def test_a_slate_is_one_batched_pass_ranked_with_one_impression_per_candidate(world):
    scorer, g, _ = _guarded(world)
    srv = Server(scorer, guard=g)
    try:
        items = [str(i) for i in range(1, 1001)]
        r = requests.post(f"{srv.url}/score", json={"user_id": "13", "candidates": items}, timeout=60)
        assert r.status_code == 200, r.text
        ranking = r.json()["ranking"]
        assert len(ranking) == 1000 and {x["item_id"] for x in ranking} == set(items)
        probs = [x["probability"] for x in ranking]
        assert probs == sorted(probs, reverse=True)
        assert len({x["impression_id"] for x in ranking}) == 1000
        one = requests.post(f"{srv.url}/score", json={"user_id": "13", "item_id": "100"}).json()
        in_slate = next(x for x in ranking if x["item_id"] == "100")
        assert in_slate["base_probability"] == pytest.approx(one["base_probability"], abs=1e-5)
        iid = ranking[0]["impression_id"]
        assert requests.post(f"{srv.url}/feedback", json={"impression_id": iid, "label": 1}).json()["written"]
        assert requests.post(f"{srv.url}/feedback", json={"impression_id": iid, "label": 1}).json()["duplicate"]
        assert requests.post(f"{srv.url}/feedback", json={"impression_id": iid, "label": 0}).status_code == 409
        forged = iid.rsplit(".", 1)[0] + ".5000"
        assert requests.post(f"{srv.url}/feedback", json={"impression_id": forged, "label": 0}).status_code == 404
    finally:
        srv.stop()
        scorer.close()


def test_context_never_overrides_an_online_feature(world):
    scorer, g, _ = _guarded(world)
    srv = Server(scorer, guard=g)
    try:
        base = requests.post(f"{srv.url}/score", json={"user_id": "13", "item_id": "100"}).json()
        for name in ("user_ctr_7d", "item_ctr_all", "user_imp_all"):
            r = requests.post(f"{srv.url}/score", json={"user_id": "13", "item_id": "100", "context": {name: 0.99}})
            assert r.status_code == 422, r.text
        # and inside the scorer the lookup wins even over a context column it was never told about
        from jobs.serve import score_slate

        _, rows = score_slate(scorer, g, "13", ["100"], {"hour": 3})
        assert rows[0]["base_probability"] == pytest.approx(base["base_probability"], abs=0.2)
    finally:
        srv.stop()
        scorer.close()


def test_feedback_flood_from_one_client_is_capped_alerted_and_kept_out_of_the_rebuild_buffer(world):
    """Issue 18's probe: 5,000 fake label-0 outcomes for one (user, item) from one client. With the default
    caps (2 per pair per 60 s) the memory takes 2 of them: the bound is lam * 2 / (2 + shrinkage) = .10."""
    from online_models.memory import SERVING_MEMORY

    scorer, g, alerts = _guarded(world)
    srv = Server(scorer, guard=g)
    try:
        s = requests.Session()

        def score(u, i):
            return s.post(f"{srv.url}/score", json={"user_id": u, "item_id": i}).json()

        others = [("13", i) for i in ("181", "258", "50", "1")] + [
            ("7", "50"),
            ("196", "242"),
            ("1", "1"),
            ("42", "100"),
        ]
        before = {p: score(*p)["probability"] for p in [("13", "100")] + others}
        outcomes_before = scorer.health()["outcomes_buffered"]
        codes: dict[int, int] = {}
        from jobs.serve import score_slate

        slate = [str(100)] * 1000  # 5 slates of the same item: 5,000 issued impressions of one pair (issued
        for _ in range(5):  # in process: /score refuses a slate with an item twice)
            _, ranking = score_slate(scorer, g, "13", slate, {})
            for x in ranking:
                c = s.post(f"{srv.url}/feedback", json={"impression_id": x["impression_id"], "label": 0}).status_code
                codes[c] = codes.get(c, 0) + 1
        after = {p: score(*p)["probability"] for p in before}
        bound = SERVING_MEMORY["lam"] * 2 / (2 + SERVING_MEMORY["shrinkage"])
        assert codes == {200: 2, 429: 4998}
        assert abs(after[("13", "100")] - before[("13", "100")]) <= bound + 1e-6
        assert all(abs(after[p] - before[p]) <= bound + 1e-6 for p in others)
        assert scorer.health()["outcomes_buffered"] - outcomes_before == 2  # only accepted outcomes
        assert len(alerts) == 1 and alerts[0]["kind"] == "feedback_lockstep" and alerts[0]["item_id"] == "100"
        print(
            f"\nflood: pair {before[('13', '100')]:.3f} -> {after[('13', '100')]:.3f} (bound {bound:.3f}); "
            f"max other move {max(abs(after[p] - before[p]) for p in others):.3f}"
        )
    finally:
        srv.stop()
        scorer.close()


def test_the_body_limit_is_enforced_while_reading(world):
    import resource

    scorer, g, _ = _guarded(world)
    srv = Server(scorer, guard=g)
    try:

        def trickle():  # 200 MB, chunked (no Content-Length to trust)
            chunk = b'{"user_id": "' + b"x" * (1 << 20)
            for _ in range(200):
                yield chunk

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            r = requests.post(f"{srv.url}/score", data=trickle(), timeout=60)
            assert r.status_code == 413
        except requests.ConnectionError:
            pass  # the server answered 413 and closed while the client was still sending
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert grown_mb < 50, grown_mb
        assert requests.post(f"{srv.url}/score", json={"user_id": "1", "item_id": "2"}).status_code == 200
    finally:
        srv.stop()
        scorer.close()


def test_bearer_token_is_required_when_set_and_off_loopback(world, monkeypatch):
    from jobs.serve import main

    scorer, g, _ = _guarded(world)
    srv = Server(scorer, token="s3cret", guard=g)
    try:
        body = {"user_id": "1", "item_id": "2"}
        assert requests.post(f"{srv.url}/score", json=body).status_code == 401
        assert requests.post(f"{srv.url}/score", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert (
            requests.post(f"{srv.url}/score", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        )
        assert requests.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()
        scorer.close()
    monkeypatch.delenv("RELOOP_SERVE_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--registry", "/nonexistent"]) == 2
