"""Serving under delayed labels (``reloop run --label-delay``): each impression is scored at its own time with
the memory holding exactly the outcomes that had arrived before it, and its outcome is written when it
arrives; the trainer may learn only what has arrived; every served version learned only labels that arrived
before the impressions it serves."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from jobs.examples import write_example_files
from jobs.registry import ModelRegistry
from jobs.scoring import load_bundle, serve_timeline
from jobs.trainer import IncrementalTrainer, TrainerConfig
from online_models.memory import SERVING_MEMORY
from reloop.evaluate_delayed import DelayedEvalConfig, joined_examples
from reloop.live import DelayedServingLoop

N = 4000
FREE = 1000
WINDOW = 3_600_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("delayed")
    delayed, _, _ = joined_examples(DelayedEvalConfig(limit=N, window_ms=WINDOW))
    # the example store of the join: in label-arrival order
    store = delayed.sort_by([("label_ts", "ascending"), ("ts", "ascending"), ("kafka_offset", "ascending")])
    write_example_files(store, str(root / "examples"), rows_per_file=500)
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
    reg = ModelRegistry(str(root / "reg"))
    reg.promote(reg.versions()[0], reason="bootstrap")
    return {"root": root, "trainer": trainer, "registry": reg, "store": store}


def _loop(world, **kw) -> DelayedServingLoop:
    return DelayedServingLoop(
        str(world["root"] / "examples"), world["registry"], dict(SERVING_MEMORY), window_ms=WINDOW, batch_size=256, **kw
    )


def test_the_first_version_knows_up_to_the_newest_label_it_learned(world) -> None:
    reg, store = world["registry"], world["store"]
    horizon = reg.entry(reg.versions()[0]).training_range["trained_until_ts"]
    assert horizon == int(store["label_ts"].to_numpy()[:FREE].max())
    assert horizon > int(store["ts"].to_numpy()[:FREE].max()) - WINDOW


def test_each_impression_sees_exactly_the_outcomes_that_had_arrived(world) -> None:
    loop = _loop(world)
    loop.step(max_batches=4)  # the horizon: the newest negative read, less the window
    assert loop.has_pending() and 0 < loop.read < world["store"].num_rows
    assert (world["store"]["ts"].to_numpy()[: loop.read] > loop.clock).any(), "impressions not yet safe wait"
    while loop.step(max_batches=3):
        pass
    loop.final = True  # the feature job has emitted everything: run to the end
    while loop.step():
        pass
    assert loop.scored > 0
    a = loop.trace.arrays()
    store = world["store"]
    assert len(a["ts"]) == loop.scored and not loop.has_pending()
    served_mem = dict(zip(a["event_id"].tolist(), a["p_mem"].tolist()))

    # the reference, built from first principles on the whole stream at once: impressions of the
    # served rows at ts, every outcome at label_ts, outcomes after impressions of the same time
    bundle = load_bundle(world["registry"], world["registry"].versions()[0], dict(SERVING_MEMORY))
    horizon = bundle.entry.training_range["trained_until_ts"]
    ts, lts = store["ts"].to_numpy(), store["label_ts"].to_numpy()
    seq = np.arange(store.num_rows)
    served = (seq >= FREE) & (ts > horizon)
    rows = np.concatenate([seq[served], seq])
    when = np.concatenate([ts[served], lts])
    kind = np.concatenate([np.zeros(served.sum(), np.int8), np.ones(len(seq), np.int8)])
    order = np.lexsort((rows, kind, when))
    rows, kind = rows[order], kind[order]
    _, p_mem = serve_timeline(bundle, store.take(pa.array(rows)), kind.astype(bool))
    ids = store["event_id"].to_numpy(zero_copy_only=False)
    want = {ids[r]: p for r, k, p in zip(rows, kind, p_mem) if not k}
    assert set(served_mem) == set(want)
    got = np.array([served_mem[e] for e in want])
    assert np.allclose(got, np.array(list(want.values())), atol=1e-6)
    # and the memory did help on what had arrived (it is not a no-op)
    assert not np.allclose(a["p_mem"], a["p_base"])


def test_the_trainer_may_learn_only_the_prefix_whose_labels_arrived(world) -> None:
    loop = _loop(world)
    loop.step(max_batches=4)
    store = world["store"]
    lts = store["label_ts"].to_numpy()
    assert loop.passed <= loop.read
    # every row the trainer may learn had its label arrive on the serving timeline
    assert (lts[: loop.passed] <= loop.clock).all()
    if loop.passed < loop.read:
        assert lts[loop.passed] >= loop.clock or not loop._state["written"][0]


def test_serve_timeline_equals_one_step_at_a_time(world) -> None:
    store = world["store"].slice(0, 600)
    bundle = load_bundle(world["registry"], world["registry"].versions()[0], dict(SERVING_MEMORY))
    rng = np.random.default_rng(0)
    write = rng.random(store.num_rows) < 0.5
    _, batched = serve_timeline(bundle, store, write)
    bundle.memory.reset()
    one = np.array([serve_timeline(bundle, store.slice(i, 1), write[i : i + 1])[1][0] for i in range(store.num_rows)])
    assert np.allclose(batched[~write], one[~write], atol=1e-6)


def test_a_resumed_loop_serves_every_impression_once(world, tmp_path) -> None:
    full = _loop(world)
    full.final = True
    while full.step():
        pass
    first = _loop(world)
    first.step(max_batches=5)
    assert first.open is not None and first.open.num_rows > 0  # some rows between impression and outcome
    first.save(tmp_path)
    second = _loop(world)
    second.position, second.scored, second.unscored = first.position, first.scored, first.unscored
    second.load(tmp_path)
    second.maybe_swap()
    second.final = True
    while second.step():
        pass
    a, b = first.trace.arrays()["event_id"].tolist(), second.trace.arrays()["event_id"].tolist()
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(full.trace.arrays()["event_id"].tolist())
    assert second.passed == second.read == world["store"].num_rows


def test_a_warm_up_impression_read_after_scoring_began_is_passed_over_not_a_leak(world) -> None:
    """The first version learned its warm-up freely: the first labels in label order, up to its horizon. An
    impression before that horizon whose label came later (a negative closes a window after the impression) is
    read later than the warm-up. When serving reads the store in small steps, scoring has begun by then: such an
    impression is still the warm-up's (never scored), not an event the version would serve after learning it.
    This is the CausalityError the delayed-label run test met when its first scoring step came early."""
    loop = DelayedServingLoop(
        str(world["root"] / "examples"), world["registry"], dict(SERVING_MEMORY), window_ms=WINDOW, batch_size=16
    )
    steps = 0
    while loop.step(max_batches=1):
        steps += 1
    loop.final = True
    while loop.step(max_batches=1):
        steps += 1
    store = world["store"]
    horizon = world["registry"].entry(world["registry"].versions()[0]).training_range["trained_until_ts"]
    ts, seq = store["ts"].to_numpy(), np.arange(store.num_rows)
    want = set(store["event_id"].to_numpy(zero_copy_only=False)[(seq >= FREE) & (ts > horizon)].tolist())
    a = loop.trace.arrays()
    assert steps > 100 and set(a["event_id"].tolist()) == want and loop.scored == len(want)
    assert loop.scored + loop.unscored == store.num_rows  # unscored: the warm-up rows and impressions
