"""The online learner's sparse steps against the dense reference, and one-pass test-then-train."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from online_models.learner import LearnerConfig, OnlineLearner, SparseAdagrad, iter_batches
from online_models.models import ModelConfig, build_model, memory_key


def _stream(n: int = 256, fields: int = 2, buckets: int = 50, numeric: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, buckets, (n, fields), generator=g) + torch.arange(fields) * buckets
    return {
        "cat": cat,
        "num": torch.randn(n, numeric, generator=g),
        "label": (torch.rand(n, generator=g) < 0.3).float(),
    }


def _model(kind: str, **kw) -> nn.Module:
    return build_model(ModelConfig(kind=kind, num_categorical=2, hash_buckets=50, num_numeric=3, seed=0, **kw))


class _DenseReference:
    """The learner as it was before sparse updates: dense grads, one optimizer with two groups, torch's clip."""

    def __init__(self, model: nn.Module, cfg: LearnerConfig) -> None:
        self.model, self.cfg = model, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        emb = [p for n, p in model.named_parameters() if n.startswith(("embedding.", "linear."))]
        dense = [p for n, p in model.named_parameters() if not n.startswith(("embedding.", "linear."))]
        groups = [{"params": emb, "weight_decay": 0.0}, {"params": dense, "weight_decay": cfg.weight_decay}]
        self.opt = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[cfg.optimizer](groups, lr=cfg.lr)

    def test_then_train(self, batch: dict) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            p = torch.sigmoid(self.model(batch)[0])
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
            logits, _ = self.model(batch)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]) + self.model.regularization()
            self.opt.zero_grad()
            loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return p


@pytest.mark.parametrize("kind", ["lr", "deepfm", "dcnv2"])
@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_sparse_steps_match_the_dense_reference(kind: str, optimizer: str) -> None:
    # small grad_clip so that clipping actually happens on some steps (the sparse norm must equal the dense one)
    cfg = LearnerConfig(lr=0.1, optimizer=optimizer, weight_decay=1e-4, grad_clip=0.5, seed=3)
    sparse, dense = OnlineLearner(_model(kind), cfg), _DenseReference(_model(kind), cfg)
    for b in iter_batches(_stream(), 16):
        p_s, p_d = sparse.test_then_train(b), dense.test_then_train(b)
        torch.testing.assert_close(p_s, p_d, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(sparse.model.named_parameters(), dense.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["lr", "deepfm", "dcnv2"])
def test_one_pass_test_then_train_equals_predict_then_learn(kind: str) -> None:
    a = OnlineLearner(_model(kind), LearnerConfig(lr=0.1, optimizer="adagrad", seed=1))
    b = a.clone()
    for batch in iter_batches(_stream(), 16):
        p_ref, h_ref = b.predict(batch)
        k_ref = memory_key(b.model, batch, h_ref, "hidden+user")
        b.learn(batch)
        p, k = a.test_then_train(batch, key_fn=lambda x, h: memory_key(a.model, x, h, "hidden+user"))
        assert torch.equal(p, p_ref)  # the same eval-mode scores, pre-update
        assert torch.equal(k, k_ref)  # and the key from the pre-update embeddings
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_a_step_touches_only_the_rows_of_the_batch() -> None:
    learner = OnlineLearner(_model("dcnv2"), LearnerConfig(lr=0.1, optimizer="adam", seed=0))
    before = learner.model.embedding.weight.detach().clone()
    batch = _stream(16)
    learner.test_then_train(batch)
    changed = (learner.model.embedding.weight != before).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= set(batch["cat"].flatten().tolist())
    assert len(changed) > 0
    assert learner.model.embedding.weight.grad.is_sparse


def test_sparse_adagrad_equals_torch_adagrad_on_sparse_grads() -> None:
    w1 = nn.Embedding(30, 4, sparse=True)
    w2 = copy.deepcopy(w1)
    o1, o2 = SparseAdagrad(w1.parameters(), lr=0.3), torch.optim.Adagrad(w2.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(0, 30, (12,), generator=g)  # repeated rows: their gradients add up
        target = torch.randn(12, 4, generator=g)
        for w, o in ((w1, o1), (w2, o2)):
            o.zero_grad()
            (w(idx) - target).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(w1.weight, w2.weight)


def test_adam_learns_and_state_round_trips() -> None:
    learner = OnlineLearner(_model("deepfm"), LearnerConfig(lr=0.01, optimizer="adam", seed=0))
    data = _stream(512)
    first = [learner.learn(b) for b in iter_batches(data, 32)]
    for _ in range(5):
        last = [learner.learn(b) for b in iter_batches(data, 32)]
    assert sum(last) < sum(first)
    twin = OnlineLearner(_model("deepfm"), LearnerConfig(lr=0.01, optimizer="adam", seed=0))
    twin.load_state_dict(copy.deepcopy(learner.state_dict()))  # as if saved: optimizers load state by reference
    batch = _stream(16, seed=9)
    torch.testing.assert_close(twin.predict_proba(batch), learner.predict_proba(batch))
    twin.learn(batch), learner.learn(batch)  # the optimizer state came along: the next steps agree too
    torch.testing.assert_close(twin.predict_proba(batch), learner.predict_proba(batch))
    with pytest.raises(ValueError, match="optimizers"):
        OnlineLearner(_model("deepfm"), LearnerConfig(optimizer="adagrad")).load_state_dict(
            {**learner.state_dict(), "optimizers": learner.state_dict()["optimizers"][:1] * 3}
        )


def test_steps_do_not_grow_torch_lazy_seed_queues() -> None:
    # torch.manual_seed queues a lazy CUDA re-seed with a formatted stack on every call when CUDA is not up yet
    import torch.cuda

    learner = OnlineLearner(_model("dcnv2"), LearnerConfig(seed=0))
    before = len(getattr(torch.cuda, "_queued_calls", []))
    for b in iter_batches(_stream(), 16):
        learner.learn(b)
    assert len(getattr(torch.cuda, "_queued_calls", [])) == before


def test_fast_dense_adagrad_step_is_bitwise_the_library_step(monkeypatch) -> None:
    # the learner steps a fused Adagrad by calling its two kernels directly; with that path off it calls
    # torch.optim.Adagrad.step: the weights must be the same bits after many steps (clipping on some)
    import online_models.learner as learner_mod

    cfg = LearnerConfig(lr=0.1, optimizer="adagrad", weight_decay=1e-4, grad_clip=0.5, seed=3)
    fast = OnlineLearner(_model("dcnv2"), cfg)
    slow = OnlineLearner(_model("dcnv2"), cfg)
    data = _stream(512)
    batches = list(iter_batches(data, 16))
    for b in batches:
        fast.test_then_train(b)
    monkeypatch.setattr(learner_mod, "_fused_adagrad_step", lambda opt: False)
    for b in batches:
        slow.test_then_train(b)
    for (name, a), (_, b) in zip(fast.model.state_dict().items(), slow.model.state_dict().items()):
        assert torch.equal(a, b), name
    sa, sb = fast.optimizers[1].state_dict()["state"], slow.optimizers[1].state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["sum"], sb[k]["sum"]) and torch.equal(sa[k]["step"], sb[k]["step"])


@pytest.mark.parametrize("kind", ["deepfm", "dcnv2"])
def test_functional_forward_is_the_module_forward(kind: str) -> None:
    # the models run their layers through the functional ops (no Module.__call__ per layer): same numbers and the
    # same dropout draws as calling the modules
    from online_models.models import _run_mlp

    model = _model(kind, dropout=0.3)
    x = torch.randn(32, model.mlp[0].in_features)
    for training in (True, False):
        model.train(training)
        torch.manual_seed(5)
        a = model.mlp(x)
        torch.manual_seed(5)
        b = _run_mlp(model.mlp, x)
        assert torch.equal(a, b)
