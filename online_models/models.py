"""Torch CTR models over field embeddings: logistic regression, DeepFM, DCNv2 and DIN.

Every model takes the batch dict of :class:`online_models.encoding.FeatureEncoder`
(``cat`` (B, F) hashed ids, optional ``num`` (B, N) standardised numeric
features, optional ``hist`` (B, H) the user's last items) and returns
``(logits (B,), hidden (B, H))``: ``hidden`` is the last hidden layer, the key of
the error-compensation memory.

Pure-ID models overfit a sparse stream quickly, so the defaults are small
(embedding dim 8, two hidden layers of 64 and 32), use dropout and a separate
L2 penalty on the looked-up embeddings (:meth:`CTRModel.regularization`), and
always feed the numeric features straight into the deep part.

>>> cfg = ModelConfig(kind="dcnv2", num_categorical=2, hash_buckets=50, num_numeric=3, seed=0)
>>> model = build_model(cfg)
>>> batch = {"cat": torch.tensor([[1, 51], [2, 52]]), "num": torch.zeros(2, 3)}
>>> logits, hidden = model(batch)
>>> tuple(logits.shape), tuple(hidden.shape) == (2, model.hidden_dim)
((2,), True)
>>> ModelConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from online_models.errors import ReloopError
from online_models.settings import (
    KINDS,  # noqa: F401  (the one list of kinds; re-exported)
    MEMORY_KEYS,
    MODEL_ARCH,
)

if TYPE_CHECKING:  # encoding's encoder and pyarrow only appear in predict_table's signature
    import pyarrow as pa

    from online_models.encoding import EncoderConfig, FeatureEncoder


class ModelConfigError(ReloopError, ValueError):
    """A model configuration with a bad value (the message names it and the allowed values)."""


@dataclass(frozen=True)
class ModelConfig:
    """A CTR model; the constructor is the whole configuration (rebuild a model from ``to_dict()`` alone)."""

    kind: str = "dcnv2"
    num_categorical: int = 2  # categorical fields (user_id, item_id, ...), each with hash_buckets rows
    hash_buckets: int = 20_011
    num_numeric: int = 0
    embedding_dim: int = 8
    hidden_sizes: tuple[int, ...] = (64, 32)
    cross_layers: int = 2  # DCNv2 only
    dropout: float = 0.1
    weight_decay: float = 1e-5  # L2 on the dense weights (the optimizer's job; recorded here)
    embedding_l2: float = 1e-5  # L2 on the embeddings looked up by a batch (see regularization())
    use_history: bool = False  # mean-pool ``hist`` into one extra field (DIN: attend over it)
    num_bags: int = 0  # multi-valued fields (``bag``), each pooled into one extra field
    categorical_fields: tuple[str, ...] = ("user_id", "item_id")
    numeric_fields: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelConfigError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("num_categorical", "hash_buckets", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_numeric < 0 or self.cross_layers < 0:
            raise ModelConfigError("num_numeric and cross_layers must be >= 0")
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ModelConfigError(f"hidden_sizes must be a non-empty list of positive sizes, got {self.hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.embedding_l2 < 0:
            raise ModelConfigError("weight_decay and embedding_l2 must be >= 0")

    @property
    def num_fields(self) -> int:
        return self.num_categorical + self.num_bags + int(self.use_history)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        for k in ("hidden_sizes", "categorical_fields", "numeric_fields"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelConfigError(f"unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


ARCH_FIELDS = ("embedding_dim", "hidden_sizes", "cross_layers", "dropout", "embedding_l2")


def model_config_for(
    kind: str,
    encoder: EncoderConfig,
    arch: dict[str, Any] | None = None,
    *,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ModelConfig:
    """The model of ``kind`` over what ``encoder`` produces, with the architecture ``arch``.

    The one place a model's shape is decided: the fields come from the encoder (its categorical, bag, numeric
    and history fields, its hash buckets), the rest from ``arch`` (keys of :data:`ARCH_FIELDS`; missing ones
    from :data:`online_models.settings.MODEL_ARCH`, the evaluation's choice). The trainer, the retrain and
    ``reloop evaluate`` all build through it, from the config's ``model`` section.

    >>> from online_models.encoding import EncoderConfig
    >>> mc = model_config_for("dcnv2", EncoderConfig(numeric_fields=("user_ctr_1d",)), {"hidden_sizes": [16]})
    >>> mc.num_categorical, mc.num_numeric, mc.hidden_sizes, mc.embedding_dim
    (2, 1, (16,), 8)
    """
    arch = {**{k: MODEL_ARCH[k] for k in ARCH_FIELDS}, **(arch or {})}
    unknown = set(arch) - set(ARCH_FIELDS) - {"hash_buckets"}  # hash_buckets: the encoder's, checked below
    if unknown:
        raise ModelConfigError(f"unknown model architecture field(s): {', '.join(sorted(unknown))}")
    if "hash_buckets" in arch and arch["hash_buckets"] != encoder.hash_buckets:
        raise ModelConfigError(f"hash_buckets {arch['hash_buckets']} differs from the encoder's {encoder.hash_buckets}")
    return ModelConfig(
        kind=kind,
        num_categorical=len(encoder.categorical_fields),
        hash_buckets=encoder.hash_buckets,
        num_numeric=len(encoder.numeric_fields),
        num_bags=len(encoder.bag_fields),
        use_history=encoder.history_field is not None,
        categorical_fields=encoder.categorical_fields,
        numeric_fields=encoder.numeric_fields,
        embedding_dim=arch["embedding_dim"],
        hidden_sizes=tuple(arch["hidden_sizes"]),
        cross_layers=arch["cross_layers"],
        dropout=arch["dropout"],
        embedding_l2=arch["embedding_l2"],
        weight_decay=weight_decay,
        seed=seed,
    )


class CTRModel(nn.Module):
    """Base class: field embeddings + a head. Subclasses implement :meth:`head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab = (config.num_categorical + config.num_bags) * config.hash_buckets
        self.embedding = nn.Embedding(vocab, config.embedding_dim)
        self.linear = nn.Embedding(vocab, 1)  # first-order (wide) weights per id
        self.num_linear = nn.Linear(config.num_numeric, 1) if config.num_numeric else None
        self.bias = nn.Parameter(torch.zeros(1))
        self._last_emb: torch.Tensor | None = None

    @property
    def hidden_dim(self) -> int:
        raise NotImplementedError

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Field embeddings (B, F, D) and the first-order logit (B,)."""
        cat = batch["cat"]  # (B, F_cat)
        # the functional lookups of nn.Embedding.forward (no max_norm or padding here), without Module.__call__
        emb = nn.functional.embedding(cat, self.embedding.weight, sparse=self.embedding.sparse)  # (B, F_cat, D)
        wide = nn.functional.embedding(cat, self.linear.weight, sparse=self.linear.sparse).sum(dim=(1, 2)) + self.bias
        if self.config.num_bags:
            bags, bag_wide = self.embed_bags(batch)  # (B, F_bag, D), (B,)
            emb, wide = torch.cat([emb, bags], dim=1), wide + bag_wide
        if self.config.use_history and self.pools_history:
            hist = batch.get("hist")
            if hist is None:
                pooled = emb.new_zeros(emb.shape[0], 1, emb.shape[2])
            else:
                mask = (hist > 0).unsqueeze(-1).float()  # (B, H, 1)
                pooled = (self.embedding(hist) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
            emb = torch.cat([emb, pooled], dim=1)  # (B, F, D)
        if self.num_linear is not None:
            wide = wide + _linear(self.num_linear, self._num(batch)).squeeze(-1)
        self._last_emb = emb
        return emb, wide

    #: DIN attends over ``hist`` itself instead of the mean-pool of :meth:`embed`
    pools_history = True

    def embed_bags(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pooled embeddings (B, F_bag, D) of the ``bag`` fields and their summed first-order weights (B,).

        The bags share the id table (their own blocks of it), pooled by the EmbeddingBag op; 0 pads, so an
        empty or missing bag pools to zeros.
        """
        bag = batch.get("bag")
        b = batch["cat"].shape[0]
        if bag is None:
            return self.embedding.weight.new_zeros(
                b, self.config.num_bags, self.config.embedding_dim
            ), self.embedding.weight.new_zeros(b)
        flat = bag.reshape(-1, bag.shape[-1])  # (B*F_bag, L)
        pooled = nn.functional.embedding_bag(
            flat, self.embedding.weight, mode="mean", padding_idx=0, sparse=self.embedding.sparse
        )
        wide = nn.functional.embedding_bag(
            flat, self.linear.weight, mode="sum", padding_idx=0, sparse=self.linear.sparse
        )
        return pooled.view(b, -1, pooled.shape[-1]), wide.view(b, -1).sum(1)

    def dense_input(self, emb: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat input of the deep part: field embeddings, then the numeric features."""
        x = emb.flatten(1)  # (B, F*D)
        if self.config.num_numeric:
            x = torch.cat([x, self._num(batch)], dim=1)  # (B, F*D + N)
        return x

    def _num(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        num = batch.get("num")
        if num is None:
            raise KeyError(f"batch has no 'num' but the model expects {self.config.num_numeric} numeric features")
        return num

    def regularization(self) -> torch.Tensor:
        """L2 of the embeddings looked up by the last forward pass (sparse-friendly, unlike weight decay)."""
        if self._last_emb is None or self.config.embedding_l2 == 0:
            return torch.zeros(())
        return self.config.embedding_l2 * self._last_emb.pow(2).sum() / self._last_emb.shape[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_test_train(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass for test-then-train: ``(eval logits, eval hidden, train logits)``.

        The eval outputs (no dropout, no gradient) are what :meth:`forward` gives in eval mode, the train
        logits what it gives in train mode (with the graph for ``backward``). Called in train mode.
        Subclasses share the work before their first dropout (lookups, wide part, cross layers); this
        fallback runs both passes.
        """
        with torch.no_grad():
            _set_mode(self, False)
            try:
                logits_e, hidden_e = self(batch)
            finally:
                _set_mode(self, True)
        logits, _ = self(batch)
        return logits_e, hidden_e, logits


def _set_mode(module: nn.Module, training: bool) -> None:
    """Train/eval mode of ``module`` and its children, without Module.__setattr__'s per-call type checks."""
    for m in module.modules():
        object.__setattr__(m, "training", training)


def _eval_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` in eval mode (dropout off), no gradient; the modules' own mode is not touched."""
    with torch.no_grad():
        return _run_mlp(mlp, x, training=False)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``: what nn.Linear.forward computes, without Module.__call__'s hook dispatch (~3 us a call)."""
    return nn.functional.linear(x, layer.weight, layer.bias)


def _run_mlp(mlp: nn.Sequential, x: torch.Tensor, training: bool | None = None) -> torch.Tensor:
    """``mlp(x)`` for the Linear/ReLU/Dropout stacks of :func:`_mlp`, op by op: the functional calls the modules'
    ``forward`` makes (so the same numbers and the same dropout draws), without a ``Module.__call__`` per layer,
    which is a fifth of a batch-of-16 training step. ``training`` overrides the dropout layers' mode (None: their
    own). Any other layer is called as a module."""
    for m in mlp:
        if type(m) is nn.Linear:
            x = nn.functional.linear(x, m.weight, m.bias)
        elif type(m) is nn.ReLU:
            x = nn.functional.relu(x, inplace=m.inplace)
        elif type(m) is nn.Dropout:
            x = nn.functional.dropout(x, m.p, m.training if training is None else training, m.inplace)
        else:
            x = m(x)
    return x


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class LogisticRegression(CTRModel):
    """First-order model. Its "hidden layer" is the per-field logit contributions (B, F + N)."""

    @property
    def hidden_dim(self) -> int:
        return self.config.num_categorical + self.config.num_bags + self.config.num_numeric

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.linear(batch["cat"]).squeeze(-1)  # (B, F_cat)
        if self.config.num_bags:
            flat = batch["bag"].reshape(-1, batch["bag"].shape[-1])
            bag = nn.functional.embedding_bag(
                flat, self.linear.weight, mode="sum", padding_idx=0, sparse=self.linear.sparse
            )
            parts = torch.cat([parts, bag.view(parts.shape[0], -1)], dim=1)  # (B, F_cat + F_bag)
        self._last_emb = parts
        if self.num_linear is not None:
            parts = torch.cat([parts, self._num(batch) * self.num_linear.weight], dim=1)  # (B, F_cat + N)
            return parts.sum(1) + self.num_linear.bias + self.bias, parts
        return parts.sum(1) + self.bias, parts

    def forward_test_train(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, parts = self(batch)  # no dropout: eval = train
        return logits.detach(), parts.detach(), logits


class DeepFM(CTRModel):
    """DeepFM: first order + FM pairwise interactions + an MLP over [embeddings, numeric]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        d_in = config.num_fields * config.embedding_dim + config.num_numeric
        self.mlp = _mlp([d_in, *config.hidden_sizes], config.dropout)
        self.out = nn.Linear(config.hidden_sizes[-1], 1)

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_sizes[-1]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, wide = self.embed(batch)  # (B, F, D), (B,)
        fm = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)  # (B,)
        hidden = _run_mlp(self.mlp, self.dense_input(emb, batch))  # (B, H)
        return wide + fm + _linear(self.out, hidden).squeeze(-1), hidden

    def forward_test_train(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb, wide = self.embed(batch)
        first = wide + 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)
        x = self.dense_input(emb, batch)
        hidden_e = _eval_mlp(self.mlp, x)
        with torch.no_grad():
            logits_e = first + _linear(self.out, hidden_e).squeeze(-1)
        hidden = _run_mlp(self.mlp, x)
        return logits_e, hidden_e, first + _linear(self.out, hidden).squeeze(-1)


class CrossLayerV2(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l (DCN-V2, full-rank)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * _linear(self.lin, x) + x


class DCNv2(CTRModel):
    """DCN-V2 (stacked): cross layers over [embeddings, numeric], then an MLP whose last layer is the key."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        d_in = config.num_fields * config.embedding_dim + config.num_numeric
        self.cross = nn.ModuleList(CrossLayerV2(d_in) for _ in range(config.cross_layers))
        self.mlp = _mlp([d_in, *config.hidden_sizes], config.dropout)
        self.out = nn.Linear(config.hidden_sizes[-1], 1)

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_sizes[-1]

    def _trunk(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross network's output (B, d_in) and the wide logit (B,): everything before the first dropout."""
        emb, wide = self.embed(batch)  # (B, F, D), (B,)
        x0 = self.dense_input(emb, batch)  # (B, d_in)
        x = x0
        for layer in self.cross:
            x = x0 * _linear(cast(CrossLayerV2, layer).lin, x) + x  # (B, d_in): CrossLayerV2.forward, no __call__
        return x, wide

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, wide = self._trunk(batch)
        hidden = _run_mlp(self.mlp, x)  # (B, H)
        return wide + _linear(self.out, hidden).squeeze(-1), hidden

    def forward_test_train(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, wide = self._trunk(batch)
        hidden_e = _eval_mlp(self.mlp, x)
        with torch.no_grad():
            logits_e = wide + _linear(self.out, hidden_e).squeeze(-1)
        hidden = _run_mlp(self.mlp, x)
        return logits_e, hidden_e, wide + _linear(self.out, hidden).squeeze(-1)


#: hidden width of the activation unit (the paper uses 80-40 with PReLU/Dice on far larger data)
ATTENTION_HIDDEN = 32


class DIN(CTRModel):
    """Deep Interest Network over the batch dict of :class:`online_models.encoding.FeatureEncoder`: target
    attention of the candidate item over the user's recent items (Zhou et al., KDD 2018).

    The user's interest is not one fixed vector: for each candidate item, an
    activation unit scores every item of the user's history (``hist``, the last N
    items, hashed into the item-id block of the shared table) against the candidate,
    from ``[e_hist, e_cand, e_hist - e_cand, e_hist * e_cand]``; the interest is the
    weighted **sum** of the history embeddings. As in the paper, the weights are not
    softmax-normalised, so how strongly the history matches is kept, not only which
    items match. Padding (bucket 0) gets weight 0.

    The interest vector joins the other field embeddings (ids, side attributes, the
    pooled bags) and the numeric features in an MLP; its last hidden layer is the
    error-compensation memory's key, as for the other models. The first-order
    (wide) part is the models' usual one.

    >>> cfg = ModelConfig(kind="din", num_categorical=2, hash_buckets=50, num_numeric=1, use_history=True, seed=0)
    >>> m = build_model(cfg)
    >>> b = {"cat": torch.tensor([[1, 51], [2, 52]]), "num": torch.zeros(2, 1),
    ...      "hist": torch.tensor([[51, 53, 0], [0, 0, 0]])}
    >>> logits, hidden = m(b)
    >>> tuple(logits.shape), tuple(hidden.shape) == (2, m.hidden_dim)
    ((2,), True)
    >>> m.attention_weights(b)[1].abs().sum().item()   # an empty history has no weights
    0.0
    """

    pools_history = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if not config.use_history:
            raise ModelConfigError(
                "kind 'din' attends over the user's history: set use_history=True "
                "(and an encoder history_field, e.g. user_last_items)"
            )
        fields = config.categorical_fields
        # the candidate item is the query; its id field's position in ``cat`` (the encoder's field order)
        self.item_field = fields.index("item_id") if "item_id" in fields else min(1, config.num_categorical - 1)
        d = config.embedding_dim
        self.attention = nn.Sequential(nn.Linear(4 * d, ATTENTION_HIDDEN), nn.PReLU(), nn.Linear(ATTENTION_HIDDEN, 1))
        d_in = config.num_fields * d + config.num_numeric
        self.mlp = _mlp([d_in, *config.hidden_sizes], config.dropout)
        self.out = nn.Linear(config.hidden_sizes[-1], 1)

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_sizes[-1]

    def _history(self, batch: dict[str, torch.Tensor], query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hist = batch.get("hist")
        if hist is None:  # no history column: an empty history
            hist = batch["cat"].new_zeros(batch["cat"].shape[0], 1)
        keys = self.embedding(hist)  # (B, H, D)
        q = query.unsqueeze(1).expand_as(keys)  # (B, H, D)
        score = self.attention(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)  # (B, H)
        return score * (hist > 0).float(), keys

    def attention_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The activation weights (B, H) of the history items for each row's candidate (0 on padding)."""
        with torch.no_grad():
            query = self.embedding(batch["cat"][:, self.item_field])
            return self._history(batch, query)[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, wide = self.embed(batch)  # (B, F_cat + F_bag, D), (B,)
        w, keys = self._history(batch, emb[:, self.item_field])  # (B, H), (B, H, D)
        interest = (w.unsqueeze(-1) * keys).sum(1, keepdim=True)  # (B, 1, D)
        emb = torch.cat([emb, interest], dim=1)  # (B, F, D)
        self._last_emb = emb
        hidden = self.mlp(self.dense_input(emb, batch))  # (B, H_last)
        return wide + self.out(hidden).squeeze(-1), hidden


#: the examples' column of the user's last items (pipelines.aggregates writes it, most recent first)
HISTORY_FIELD = "user_last_items"


def history_field(kind: str) -> str | None:
    """The encoder's ``history_field`` a model of ``kind`` needs: DIN attends over the last items, others not.

    >>> history_field("din"), history_field("dcnv2")
    ('user_last_items', None)
    """
    return HISTORY_FIELD if kind == "din" else None


def build_model(config: ModelConfig) -> CTRModel:
    """The model of ``config.kind``, initialised deterministically from ``config.seed``."""
    cls = {"lr": LogisticRegression, "deepfm": DeepFM, "dcnv2": DCNv2, "din": DIN}[config.kind]
    # a private generator: building a model never disturbs (or depends on) the global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = cls(config)
        with torch.no_grad():
            nn.init.normal_(model.embedding.weight, std=0.01)
            nn.init.zeros_(model.linear.weight)
    return model


# ---------------------------------------------------------------------------------------------------------
# predicting: the one "forward + sigmoid" (OnlineLearner.predict is its learner-side twin)


@torch.no_grad()
def predict_with_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Click probabilities (B,) and the last hidden layer (B, H) of one encoded batch: the sigmoid of the
    model's logits with dropout off and no gradient; the model's train/eval mode is left as it was.

    >>> m = build_model(ModelConfig(kind="deepfm", num_categorical=2, hash_buckets=10, seed=0))
    >>> p, h = predict_with_hidden(m, {"cat": torch.tensor([[1, 11], [2, 12]])})
    >>> tuple(p.shape), tuple(h.shape) == (2, m.hidden_dim), bool(((p > 0) & (p < 1)).all()), m.training
    ((2,), True, True, True)
    """
    if not model.training:  # a served model (registry.load_model gives eval mode): no walk over its modules
        logits, hidden = model(batch)
        return torch.sigmoid(logits), hidden
    _set_mode(model, False)
    try:
        logits, hidden = model(batch)
    finally:
        _set_mode(model, True)
    return torch.sigmoid(logits), hidden


def predict_proba(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Click probabilities (B,) of one encoded batch (see :func:`predict_with_hidden`)."""
    return predict_with_hidden(model, batch)[0]


def predict_table(model: nn.Module, encoder: FeatureEncoder, table: pa.Table, batch_size: int = 4096) -> np.ndarray:
    """:func:`predict_proba` of every row of ``table``, encoded by ``encoder`` ``batch_size`` rows at a time.

    The model's dtype (float32); an empty table gives an empty float64 array.

    >>> import pyarrow as pa
    >>> from online_models.encoding import EncoderConfig, FeatureEncoder
    >>> enc = FeatureEncoder(EncoderConfig(hash_buckets=10))
    >>> m = build_model(ModelConfig(kind="lr", num_categorical=2, hash_buckets=10, num_numeric=0))
    >>> predict_table(m, enc, pa.table({"user_id": ["a", "b", "c"], "item_id": ["x", "y", "z"]}), 2).shape
    (3,)
    """
    out = [
        predict_proba(model, encoder.encode(table.slice(lo, batch_size))).numpy()
        for lo in range(0, table.num_rows, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0)


def criteo_like_config(hash_buckets: int = 100_003, seed: int = 0) -> ModelConfig:
    """A production-size CTR model: Criteo's shape (13 numeric + 26 categorical fields), embedding 16, DCNv2 with 3
    cross layers and an MLP of 3x400 (the DCN-V2 paper's public-data setups). What the memory's cost is measured
    against (``benchmarks/bench_memory.py``)."""
    return ModelConfig(
        kind="dcnv2",
        num_categorical=26,
        hash_buckets=hash_buckets,
        num_numeric=13,
        embedding_dim=16,
        hidden_sizes=(400, 400, 400),
        cross_layers=3,
        dropout=0.0,
        categorical_fields=tuple(f"C{i}" for i in range(1, 27)),
        numeric_fields=tuple(f"I{i}" for i in range(1, 14)),
        seed=seed,
    )


def synthetic_batch(config: ModelConfig, n: int, seed: int = 0, zipf: float = 1.1) -> dict[str, torch.Tensor]:
    """``n`` encoded rows of ``config``'s shape: Zipf-distributed ids per field (a few ids are most of the
    traffic, as in click logs), standard-normal numeric features, and labels drawn from a fixed random
    logistic model of both (so the batch is learnable; ~25% positives).

    >>> b = synthetic_batch(criteo_like_config(hash_buckets=1000), 8)
    >>> tuple(b["cat"].shape), tuple(b["num"].shape), tuple(b["label"].shape)
    ((8, 26), (8, 13), (8,))
    >>> bool((b["cat"][:, 1] >= 1000).all() and (b["cat"][:, 1] < 2000).all())   # field j owns rows j*buckets..
    True
    """
    g = torch.Generator().manual_seed(seed)
    f, nb = config.num_categorical, config.hash_buckets
    ranks = torch.arange(1, nb + 1, dtype=torch.float64)
    probs = ranks.pow(-zipf)
    ids = torch.multinomial(probs / probs.sum(), n * f, replacement=True, generator=g).view(n, f)
    # a fixed permutation per field: the popular ids are not the same row numbers in every field
    perm = torch.stack([torch.randperm(nb, generator=torch.Generator().manual_seed(seed * 1000 + j)) for j in range(f)])
    cat = torch.gather(perm, 1, ids.t()).t() + torch.arange(f) * nb
    num = torch.randn(n, config.num_numeric, generator=g)
    w_id = torch.randn(f * nb, generator=torch.Generator().manual_seed(seed + 1)) * 0.3
    w_num = torch.randn(config.num_numeric, generator=torch.Generator().manual_seed(seed + 2)) * 0.3
    logit = w_id[cat].sum(1) + num @ w_num - 1.2
    label = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return {"cat": cat, "num": num, "label": label}


#: weight of the identity part of "hidden+user" keys relative to the unit-normalised hidden layer: with more
#: weight on the user, the SimHash buckets mostly group a user's own recent outcomes. Chosen on the ML-100K
#: validation slot (DCNv2, incremental+memory AUC/logloss): 1 -> .7563/.5786, 2 -> .7574/.5775, 4 -> .7589/.5766,
#: 8 -> .7593/.5769, 16 -> .7586/.5780 (model alone .7529/.5808); 4 and 8 tie on AUC, 4 has the lower logloss
USER_KEY_WEIGHT = 4.0


def memory_key(
    model: CTRModel, batch: dict[str, torch.Tensor], hidden: torch.Tensor, kind: str = "hidden"
) -> torch.Tensor:
    """The error-compensation memory's key of a batch.

    ``hidden`` is the model's last hidden layer (ReLoop2). ``hidden+ids`` also appends the (unit-normalised)
    embeddings of the first two categorical fields (user and item), so the SimHash buckets group samples of the
    same user/item with a similar representation: the last layer alone mostly encodes the predicted click
    level, which the model already knows. ``hidden+user`` appends only the user embedding, weighted by
    ``USER_KEY_WEIGHT``, so a bucket is mostly one user's recent outcomes near this representation.

    >>> m = build_model(ModelConfig(kind="deepfm", num_categorical=2, hash_buckets=10, embedding_dim=4))
    >>> b = {"cat": torch.tensor([[1, 11]])}
    >>> h = m(b)[1]
    >>> tuple(memory_key(m, b, h, "hidden+ids").shape) == (1, m.hidden_dim + 8)
    True
    """
    if kind == "hidden":
        return hidden
    if kind not in MEMORY_KEYS:
        raise ValueError(f"memory key must be one of {', '.join(MEMORY_KEYS)}, got {kind!r}")
    fields = 1 if kind == "hidden+user" else min(2, batch["cat"].shape[1])
    with torch.no_grad():
        parts = [hidden.detach()] + [model.embedding(batch["cat"][:, j]) for j in range(fields)]
        parts = [p / p.norm(dim=1, keepdim=True).clamp(min=1e-8) for p in parts]
        if kind == "hidden+user":
            parts[1] = USER_KEY_WEIGHT * parts[1]
    return torch.cat(parts, dim=1)  # (B, H + fields*D)


def memory_key_dim(model: CTRModel, kind: str = "hidden") -> int:
    """Width of :func:`memory_key` for ``model``."""
    fields = {"hidden": 0, "hidden+ids": min(2, model.config.num_categorical), "hidden+user": 1}[kind]
    extra = fields * model.config.embedding_dim
    return model.hidden_dim + extra
