"""Fake-negative corrections: FNW / FNC recover the unbiased click rate from a fake-negative stream."""

from __future__ import annotations

import numpy as np
import torch

from online_models.delayed import fnc_calibrate, fnw_weights, learn_weighted
from online_models.learner import LearnerConfig, OnlineLearner
from online_models.models import ModelConfig, build_model


def test_weights_and_calibration():
    p = torch.tensor([0.0, 0.5, 0.9])
    assert torch.allclose(fnw_weights(p, torch.ones(3)), 1 + p)
    assert torch.allclose(fnw_weights(p, torch.zeros(3)), (1 - p) * (1 + p))
    b = torch.tensor([0.1, 0.25])
    assert torch.allclose(fnc_calibrate(b), b / (1 - b))


def _fake_negative_stream(n=6000, seed=0):
    """Every impression as a negative, every click again as a positive (the biased stream)."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 4, n)
    ctr = np.array([0.05, 0.2, 0.4, 0.6])[cat]
    y = rng.random(n) < ctr
    cats = np.concatenate([cat, cat[y]])
    labels = np.concatenate([np.zeros(n), np.ones(y.sum())])
    order = rng.permutation(len(cats))
    return torch.tensor(cats[order])[:, None], torch.tensor(labels[order], dtype=torch.float32)


def _train(correction):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="lr", num_categorical=1, hash_buckets=8, seed=0))
    learner = OnlineLearner(model, LearnerConfig(lr=0.05, optimizer="adam", seed=0))
    cats, labels = _fake_negative_stream()
    for _ in range(4):
        for lo in range(0, len(labels), 64):
            learn_weighted(learner, {"cat": cats[lo : lo + 64], "label": labels[lo : lo + 64]}, correction=correction)
    p = learner.predict_proba({"cat": torch.arange(4)[:, None]})
    return fnc_calibrate(p) if correction == "fnc" else p


def test_fnw_and_fnc_undo_the_fake_negative_bias():
    truth = torch.tensor([0.05, 0.2, 0.4, 0.6])
    naive = _train(None)
    assert (naive - truth / (1 + truth)).abs().max() < 0.03  # learns b = p / (1 + p): biased low
    assert (naive - truth).abs().max() > 0.15
    for correction in ("fnw", "fnc"):
        got = _train(correction)
        assert (got - truth).abs().max() < 0.06, (correction, got)
