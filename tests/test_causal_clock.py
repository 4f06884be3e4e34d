"""One causal clock: the trainer follows the serving clock, serving never uses a version that learned the
events it serves, and the deployer's gate pairs models on events neither learned from."""

from __future__ import annotations

import pytest
import torch

from jobs.deploy import DeployConfig, Deployer
from jobs.examples import ExampleStore, write_example_files
from jobs.registry import ModelRegistry
from jobs.scoring import CausalityError, load_bundle
from jobs.trainer import IncrementalTrainer, TrainerConfig
from online_models.memory import SERVING_MEMORY
from reloop.datasets import movielens_examples
from reloop.live import ServingLoop

N = 4000
FREE = 1000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    write_example_files(movielens_examples(N), str(root / "examples"), rows_per_file=500)
    cfg = TrainerConfig(
        str(root / "examples"),
        str(root / "ckpt"),
        registry_uri=str(root / "reg"),
        idle_exit=0,
        checkpoint_every=FREE,
        checkpoint_seconds=1e9,
        publish_every=1,
        model_kind="lr",
        free_examples=FREE,
    )
    trainer = IncrementalTrainer(cfg)
    trainer.run()
    return {
        "root": root,
        "trainer": trainer,
        "registry": ModelRegistry(str(root / "reg")),
        "ts": ExampleStore(str(root / "examples")).read_window()["ts"].to_numpy(),
    }


def _loop(world) -> ServingLoop:
    return ServingLoop(str(world["root"] / "examples"), world["registry"], dict(SERVING_MEMORY), batch_size=256)


def test_the_trainer_learns_only_its_warm_up_until_the_serving_clock_allows_more(world) -> None:
    t, reg = world["trainer"], world["registry"]
    assert t.learned == FREE
    v1 = reg.versions()[0]
    horizon = reg.entry(v1).training_range["trained_until_ts"]
    assert horizon == int(world["ts"][FREE - 1])


def test_served_events_lie_after_the_horizon_and_a_later_horizon_waits(world) -> None:
    reg, t = world["registry"], world["trainer"]
    v1 = reg.versions()[0]
    reg.promote(v1, reason="bootstrap")
    loop = _loop(world)
    loop.step(max_batches=6)  # the warm-up is passed over, then ~2,500 events scored
    a = loop.trace.arrays()
    assert loop.scored > 0 and (a["ts"] > a["horizon"]).all() and (a["version"] == v1).all()
    first = loop.versions[0]
    assert first["trained_until_ts"] < first["first_served_ts"]
    # the trainer may now learn what serving has scored, and runs ahead of nothing
    t.allow(N)
    t.run()
    assert t.learned == N
    v2 = reg.versions()[-1]
    assert reg.entry(v2).training_range["trained_until_ts"] == int(world["ts"].max())
    reg.promote(v2, reason="refresh: test")  # learned every event still to be served
    loop.step()
    a = loop.trace.arrays()
    assert loop.passed == N and (a["version"] == v1).all(), "a version served events it had learned"
    assert [v["version"] for v in loop.versions] == [v1]


def test_serving_a_checkpoint_with_a_later_horizon_fails_loudly(world) -> None:
    reg = world["registry"]
    later = reg.versions()[-1]
    reg.promote(reg.versions()[0], reason="bootstrap")
    loop = _loop(world)
    loop.step(max_batches=6)
    assert loop.scored > 0
    loop.served = load_bundle(reg, later, dict(SERVING_MEMORY))  # as if the clock had not been asked
    table = next(iter(ExampleStore(str(world["root"] / "examples")).batches(loop.position, 256)))[0]
    with pytest.raises(CausalityError, match="leak from the future"):
        loop._process(table)


def test_the_gate_pairs_on_events_after_the_candidates_horizon(world, tmp_path) -> None:
    reg = world["registry"]
    v1 = reg.versions()[0]
    reg.promote(v1, reason="bootstrap")
    loop = _loop(world)
    loop.step()
    entry = reg.entry(v1)
    weights = load_bundle(reg, v1, dict(SERVING_MEMORY)).model.state_dict()

    def publish(state) -> str:
        return reg.publish(
            state,
            model_config=entry.model_config,
            feature_service=entry.feature_service,
            training_range=entry.training_range,
            extra=entry.extra,
        ).version

    same = publish(weights)
    g = torch.Generator().manual_seed(0)
    noisy = publish(
        {k: v + 3.0 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in weights.items()}
    )
    d = Deployer(
        reg,
        loop,
        DeployConfig(
            str(world["root"] / "examples"),
            str(world["root"] / "reg"),
            str(tmp_path),
            gate_events=1000,
            gate_min_events=500,
        ),
    )
    eq_refresh, eq_retrain = d.gate(same, "refresh"), d.gate(same, "retrain")
    assert eq_refresh.promote and not eq_retrain.promote and eq_refresh.n == 1000
    bad = d.gate(noisy, "refresh")
    assert not bad.promote and bad.lo > 0
    newest = loop.trace.arrays()["ts"][-1000:]
    assert d.decisions[-1]["events_ts"] == [int(newest.min()), int(newest.max())]
    assert all(k in d.decisions[-1] for k in ("n", "diff", "lo", "hi", "rule"))


def test_the_trainer_takes_over_a_promoted_retrain_of_its_own_lineage(world, tmp_path) -> None:
    t, reg = world["trainer"], world["registry"]
    entry = reg.entry(reg.versions()[-1])
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in t.model.state_dict().items()}
    later = int(world["ts"].max()) + 5
    v = reg.publish(
        state,
        model_config=entry.model_config,
        feature_service=entry.feature_service,
        training_range={"trained_until_ts": later},
        extra={**entry.extra, "source": "jobs.retrain"},
    ).version
    assert t.adopt(v) and t.adopted == v and t.trained_until_ts == later
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), state.values()))
    other = reg.publish(
        state,
        model_config=entry.model_config,
        feature_service=entry.feature_service,
        extra={**entry.extra, "encoder": {**entry.extra["encoder"], "hash_buckets": 7}},
    ).version
    assert not t.adopt(other) and t.adopted == v


def test_a_part_batch_waits_for_the_clock_to_settle_unless_serving_waits_for_the_trainer(tmp_path) -> None:
    """A part-batch up to the bound waits a poll of the clock standing still (a step on a few rows at a whole
    batch's rate makes a noisy model); told that serving waits for it, the trainer learns it at once."""
    import threading
    import time

    write_example_files(movielens_examples(2000), str(tmp_path / "examples"), rows_per_file=500)
    cfg = TrainerConfig(
        str(tmp_path / "examples"),
        str(tmp_path / "ckpt"),
        registry_uri=str(tmp_path / "reg"),
        checkpoint_every=10**6,
        checkpoint_seconds=1e9,
        model_kind="lr",
        free_examples=FREE,
        batch_size=256,
        poll_seconds=120.0,  # far longer than the test: only the signal can release the part-batch
    )
    t = IncrementalTrainer(cfg)
    th = threading.Thread(target=t.run, daemon=True)
    th.start()

    def learned(n: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and t.learned < n:
            time.sleep(0.05)
        return t.learned >= n

    try:
        assert learned(FREE, 60)
        t.allow(FREE + 100)  # the clock moved by 100 rows: less than a batch
        assert not learned(FREE + 100, 1.0) and t.learned == FREE
        t.allow(FREE + 100, still=True)
        assert learned(FREE + 100, 60) and t.learned == FREE + 100
    finally:
        t.stop()
        th.join(timeout=60)
