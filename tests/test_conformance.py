"""One conformance suite over every model and the memory (after River's ``checks``):
same seed -> same output, input not mutated, state round-trips, clone/twin independence."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load, save

from online_models.learner import LearnerConfig, OnlineLearner
from online_models.memory import ErrorCompensationMemory
from online_models.models import KINDS, ModelConfig, build_model
from online_models.river_baselines import RiverBaseline


def _batch(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "cat": torch.stack([torch.randint(1, 50, (n,), generator=g), 50 + torch.randint(1, 50, (n,), generator=g)], 1),
        "num": torch.randn(n, 3, generator=g),
        "hist": torch.randint(0, 100, (n, 4), generator=g),
        "label": (torch.rand(n, generator=g) > 0.5).float(),
    }


def _clone(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in b.items()}


def _learner(kind: str, seed: int = 0, **kw) -> OnlineLearner:
    # din attends over the user's history: it needs one (the batch carries "hist")
    cfg = ModelConfig(
        kind=kind, num_categorical=2, hash_buckets=50, num_numeric=3, seed=seed, **{"use_history": kind == "din", **kw}
    )
    return OnlineLearner(build_model(cfg), LearnerConfig(lr=0.01, seed=seed))


def _river(kind: str, seed: int = 0) -> RiverBaseline:
    return RiverBaseline(kind, lr=0.05, seed=seed)


# every estimator with a learn/predict interface: (name, factory(seed))
ESTIMATORS = [(f"torch-{k}", lambda seed, k=k: _learner(k, seed)) for k in KINDS]
ESTIMATORS += [("torch-dcnv2-history", lambda seed: _learner("dcnv2", seed, use_history=True))]
ESTIMATORS += [(f"river-{k}", lambda seed, k=k: _river(k, seed)) for k in ("lr", "fm")]


@pytest.mark.parametrize("name, make", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_same_seed_same_output(name, make) -> None:
    outs = []
    for _ in range(2):
        est = make(0)
        p = [est.test_then_train(_batch(i)) for i in range(3)]
        outs.append(torch.cat(p + [est.predict_proba(_batch(9))]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name, make", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_input_not_mutated(name, make) -> None:
    est, b = make(0), _batch()
    ref = _clone(b)
    est.test_then_train(b)
    est.predict_proba(b)
    assert all(torch.equal(b[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name, make", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_predictions_are_probabilities_and_learning_changes_them(name, make) -> None:
    est, b = make(0), _batch()
    before = est.predict_proba(b)
    assert before.shape == (32,) and bool(((before >= 0) & (before <= 1)).all())
    for _ in range(5):
        est.learn(b)
    assert not torch.equal(before, est.predict_proba(b))


@pytest.mark.parametrize("kind", KINDS)
def test_model_state_round_trips_through_safetensors_and_config(kind) -> None:
    learner = _learner(kind, seed=3)
    for i in range(3):
        learner.learn(_batch(i))
    blob = save(learner.model.state_dict())
    twin = build_model(ModelConfig.from_dict(learner.model.config.to_dict()))
    twin.load_state_dict(load(blob))
    twin.eval()
    learner.model.eval()
    b = _batch(5)
    assert torch.equal(twin(b)[0], learner.model(b)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_learner_clone_is_independent(kind) -> None:
    a = _learner(kind)
    a.learn(_batch(0))
    b = a.clone()
    assert torch.equal(a.predict_proba(_batch(1)), b.predict_proba(_batch(1)))
    b.learn(_batch(2))
    assert not torch.equal(a.predict_proba(_batch(1)), b.predict_proba(_batch(1)))


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_is_the_declared_memory_key(kind) -> None:
    model = build_model(
        ModelConfig(kind=kind, num_categorical=2, hash_buckets=50, num_numeric=3, use_history=kind == "din")
    )
    logits, hidden = model(_batch())
    assert logits.shape == (32,) and hidden.shape == (32, model.hidden_dim)
    mem = ErrorCompensationMemory(dim=model.hidden_dim, seed=0)
    mem.write(hidden, _batch()["label"], torch.sigmoid(logits))


def test_model_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    build_model(ModelConfig(kind="dcnv2", num_categorical=2, hash_buckets=50, seed=7))
    assert torch.equal(torch.rand(1), expected)


def test_memory_conformance() -> None:
    def run(seed: int) -> torch.Tensor:
        mem = ErrorCompensationMemory(dim=6, num_tables=4, bits=4, decay=0.999, shrinkage=1.0, seed=seed)
        g = torch.Generator().manual_seed(0)
        h, y, p = (
            torch.randn(64, 6, generator=g),
            (torch.rand(64, generator=g) > 0.5).float(),
            torch.rand(64, generator=g),
        )
        refs = (h.clone(), y.clone(), p.clone())
        mem.write(h, y, p)
        out = mem.estimate(h, p)
        assert torch.equal(h, refs[0]) and torch.equal(y, refs[1]) and torch.equal(p, refs[2])  # not mutated
        buf = io.BytesIO(save(mem.state_dict()))
        twin = ErrorCompensationMemory(dim=6, num_tables=4, bits=4, decay=0.999, shrinkage=1.0, seed=seed)
        twin.load_state_dict(load(buf.getvalue()))
        assert torch.equal(twin.estimate(h, p), out)  # round trip
        return out

    assert torch.equal(run(0), run(0))  # same seed, same output
    assert not torch.equal(run(0), run(1))  # the seed matters (different hyperplanes)
