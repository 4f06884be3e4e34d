"""DIN: target attention of the candidate item over the user's recent items (Zhou et al., KDD 2018).

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

>>> from online_models.models import ModelConfig, build_model
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

from __future__ import annotations

import torch
from torch import nn

from online_models.models import CTRModel, ModelConfig, ModelConfigError, _mlp

#: hidden width of the activation unit (the paper uses 80-40 with PReLU/Dice on far larger data)
ATTENTION_HIDDEN = 32


class DIN(CTRModel):
    """Deep Interest Network over the batch dict of :class:`online_models.encoding.FeatureEncoder`."""

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
