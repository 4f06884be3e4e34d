"""Turn an Arrow table of training examples into the batch dict the models eat.

The encoder is configuration only (no learned vocabulary), so the trainer, the
evaluation and the scoring service (one request = a batch of one) produce
exactly the same tensors from the same rows.

Identifiers are **hashed**, not looked up in a growing vocabulary: each
categorical field value goes through a salted-free, process-independent hash
(BLAKE2b of ``"field=value"``) into ``hash_buckets - 1`` buckets; bucket 0 is
reserved for a missing value. An id never seen in training therefore lands in
an ordinary bucket (its embedding is whatever that bucket learned, shared with
the ids that collide with it) and can never raise an ``IndexError``. The price
is collisions, which ``hash_buckets`` controls.

Numeric features are ``log1p`` of their absolute value (sign kept), so counts
spanning orders of magnitude become comparable, or, for the ``logit_fields``
(click rates), their log-odds; then standardised with a mean
and standard deviation that live in the config (fitted once on warm-up data
with :meth:`FeatureEncoder.fit`); missing values become 0 after
standardisation (the mean) and everything is clipped to +-5.

The batch dict:

- ``cat``: int64 (B, F_cat) bucket per categorical field, offset so each
  field owns its own rows of one embedding table of ``F_cat * hash_buckets``;
- ``num``: float32 (B, F_num);
- ``hist``: int64 (B, N) buckets of the user's last items (0 = padding), if
  ``history_field`` is set and present;
- ``bag``: int64 (B, F_bag, L) buckets of the values of each multi-valued field
  (``bag_fields``, list<string> columns such as an item's genres; 0 = padding),
  each field owning the block after the categorical ones (the models pool a
  bag with an ``EmbeddingBag`` over the shared table);
- ``label``: float32 (B,) when the table has a ``label`` column.

>>> import pyarrow as pa
>>> enc = FeatureEncoder(EncoderConfig(numeric_fields=("user_ctr",), hash_buckets=101))
>>> t = pa.table({"user_id": ["u1", "u2", None], "item_id": ["i1", "i1", "i9"],
...               "user_ctr": [0.5, None, 0.1], "label": [1, 0, 1]})
>>> b = enc.encode(t)
>>> sorted(b), tuple(b["cat"].shape), tuple(b["num"].shape)
(['cat', 'label', 'num'], (3, 2), (3, 1))
>>> int(b["cat"][2, 0])  # a missing user id is bucket 0 of the user field
0
>>> bool((b["cat"][:, 1] >= 101).all())  # the item field owns rows 101..201
True
>>> enc.encode(t)["cat"].equal(b["cat"])  # deterministic
True
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from online_models.errors import ReloopError

#: rates are clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] before their log-odds
LOGIT_CLIP = 1e-3


class EncodingError(ReloopError, ValueError):
    """A table that cannot be encoded: a missing column or a bad encoder configuration."""


@dataclass(frozen=True)
class EncoderConfig:
    """How rows become tensors. The constructor is the whole configuration."""

    categorical_fields: tuple[str, ...] = ("user_id", "item_id")
    numeric_fields: tuple[str, ...] = ()
    hash_buckets: int = 20_011
    history_field: str | None = None  # e.g. "user_last_items" (list<string>), hashed into the item_id field
    history_len: int = 10
    # numeric fields that are rates in [0, 1] (e.g. smoothed CTRs): log-odds instead of log1p, so the model sees
    # a click rate on the scale its logit adds up on (a rate of .9 vs .8 is a big step, .5 vs .4 a small one)
    logit_fields: tuple[str, ...] = ()
    numeric_mean: tuple[float, ...] | None = None
    numeric_std: tuple[float, ...] | None = None
    # multi-valued (list<string>) columns, e.g. an item's genres: the first bag_len values of each row
    bag_fields: tuple[str, ...] = ()
    bag_len: int = 8

    def __post_init__(self) -> None:
        if self.hash_buckets < 2:
            raise EncodingError(
                f"hash_buckets must be >= 2 (bucket 0 is reserved for missing), got {self.hash_buckets}"
            )
        if not self.categorical_fields:
            raise EncodingError("categorical_fields must name at least one column (e.g. user_id)")
        if self.bag_len < 1:
            raise EncodingError(f"bag_len must be >= 1, got {self.bag_len}")
        if self.history_len < 1:
            raise EncodingError(f"history_len must be >= 1, got {self.history_len}")
        unknown = set(self.logit_fields) - set(self.numeric_fields)
        if unknown:
            raise EncodingError(f"logit_fields {', '.join(sorted(unknown))} are not numeric_fields")
        for name, stats in (("numeric_mean", self.numeric_mean), ("numeric_std", self.numeric_std)):
            if stats is not None and len(stats) != len(self.numeric_fields):
                raise EncodingError(f"{name} has {len(stats)} values for {len(self.numeric_fields)} numeric_fields")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        d = dict(d)
        for k in ("categorical_fields", "numeric_fields", "logit_fields", "numeric_mean", "numeric_std", "bag_fields"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def stable_bucket(field_name: str, value: str, buckets: int) -> int:
    """Bucket of one value in ``1..buckets-1`` (0 is reserved for missing); the same in every process.

    >>> stable_bucket("user_id", "42", 1000) == stable_bucket("user_id", "42", 1000)
    True
    >>> 1 <= stable_bucket("user_id", "never-seen", 1000) < 1000
    True
    """
    digest = hashlib.blake2b(f"{field_name}={value}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


@dataclass(frozen=True)
class FeatureEncoder:
    """Stateless encoder of Arrow tables into model batches (see the module docstring)."""

    config: EncoderConfig = field(default_factory=EncoderConfig)

    @property
    def num_categorical(self) -> int:
        return len(self.config.categorical_fields)

    @property
    def num_numeric(self) -> int:
        return len(self.config.numeric_fields)

    @property
    def num_bags(self) -> int:
        return len(self.config.bag_fields)

    @property
    def vocab_size(self) -> int:
        """Rows of the shared embedding table: one block of ``hash_buckets`` per categorical and bag field."""
        return (self.num_categorical + self.num_bags) * self.config.hash_buckets

    def fit(self, table: pa.Table) -> FeatureEncoder:
        """A new encoder whose numeric mean/std come from ``table`` (e.g. the warm-up period)."""
        if not self.config.numeric_fields:
            return self
        raw = self._numeric_raw(table)
        mean = np.nanmean(raw, axis=0) if len(raw) else np.zeros(raw.shape[1])
        std = np.nanstd(raw, axis=0) if len(raw) else np.ones(raw.shape[1])
        mean = np.nan_to_num(mean, nan=0.0)
        std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
        return FeatureEncoder(
            replace(self.config, numeric_mean=tuple(float(x) for x in mean), numeric_std=tuple(float(x) for x in std))
        )

    def encode(self, table: pa.Table) -> dict[str, torch.Tensor]:
        """The batch dict of ``table`` (see the module docstring); never mutates ``table``."""
        cfg = self.config
        have = set(table.column_names)  # built once: column_names makes a new list on every access
        missing = [c for c in (*cfg.categorical_fields, *cfg.numeric_fields, *cfg.bag_fields) if c not in have]
        if missing:
            raise EncodingError(f"missing column(s) {', '.join(missing)}; have {', '.join(table.column_names)}")
        cols = [self._hash_column(table[c], c) + j * cfg.hash_buckets for j, c in enumerate(cfg.categorical_fields)]
        batch = {"cat": torch.from_numpy(np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0), np.int64))}
        if cfg.numeric_fields:
            raw = self._numeric_raw(table)
            mean = np.asarray(cfg.numeric_mean if cfg.numeric_mean is not None else [0.0] * raw.shape[1])
            std = np.asarray(cfg.numeric_std if cfg.numeric_std is not None else [1.0] * raw.shape[1])
            z = np.nan_to_num((raw - mean) / std, nan=0.0)
            batch["num"] = torch.from_numpy(np.clip(z, -5.0, 5.0).astype(np.float32))
        if cfg.history_field and cfg.history_field in table.column_names:
            batch["hist"] = torch.from_numpy(self._history(table[cfg.history_field]))
        if cfg.bag_fields:
            offset = self.num_categorical * cfg.hash_buckets
            batch["bag"] = torch.from_numpy(
                np.stack(
                    [self._bag(table[c], c, offset + j * cfg.hash_buckets) for j, c in enumerate(cfg.bag_fields)],
                    axis=1,
                )
            )
        if "label" in table.column_names:
            batch["label"] = torch.from_numpy(table["label"].to_numpy(zero_copy_only=False).astype(np.float32))
        return batch

    # -- helpers -------------------------------------------------------------------------------------

    def _hash_column(self, col: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
        # hash each distinct value once: a stream has far fewer distinct ids than rows
        col = pc.cast(col, pa.string())
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        enc = pc.dictionary_encode(col)
        lut = np.array(
            [stable_bucket(name, v, self.config.hash_buckets) for v in enc.dictionary.to_pylist()] + [0], dtype=np.int64
        )
        idx = enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)
        return lut[idx]

    def _bag(self, col: pa.ChunkedArray, name: str, offset: int) -> np.ndarray:
        # (B, bag_len): the first bag_len values of each list, hashed in the field's block; 0 pads (a null or
        # empty list is all padding, which the EmbeddingBag pools to zeros: the "missing" default)
        n = self.config.bag_len
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise EncodingError(f"bag column {name} must be a list of strings, got {col.type}")
        out = np.zeros((len(col), n), dtype=np.int64)
        flat = col.flatten()
        if len(flat):
            buckets = self._hash_column(flat, name)
            buckets = np.where(buckets > 0, buckets + offset, 0)  # a null value inside a list pads too
            offsets = col.offsets.to_numpy()
            for i in range(len(col)):
                lo, hi = offsets[i], offsets[i + 1]
                seq = buckets[lo : min(hi, lo + n)]
                out[i, : len(seq)] = seq
        return out

    def _numeric_raw(self, table: pa.Table) -> np.ndarray:
        out = np.empty((table.num_rows, self.num_numeric), dtype=np.float64)
        logit = set(self.config.logit_fields)
        for j, c in enumerate(self.config.numeric_fields):
            try:
                x = pc.cast(table[c], pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise EncodingError(f"numeric column {c} cannot be read as float: {e}") from e
            if c in logit:
                q = np.clip(x, LOGIT_CLIP, 1.0 - LOGIT_CLIP)
                out[:, j] = np.log(q / (1.0 - q))
            else:
                out[:, j] = np.sign(x) * np.log1p(np.abs(x))
        return out

    def _history(self, col: pa.ChunkedArray) -> np.ndarray:
        n, cfg = self.config.history_len, self.config
        item_offset = (
            cfg.categorical_fields.index("item_id") * cfg.hash_buckets if "item_id" in cfg.categorical_fields else 0
        )
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        out = np.zeros((len(col), n), dtype=np.int64)
        flat = col.flatten()
        if len(flat):
            buckets = self._hash_column(flat, "item_id") + item_offset
            offsets = col.offsets.to_numpy()
            for i in range(len(col)):  # lists are short (last N items); the hashing above is vectorised
                lo, hi = offsets[i], offsets[i + 1]
                seq = buckets[max(lo, hi - n) : hi]
                out[i, : len(seq)] = seq
        return out
