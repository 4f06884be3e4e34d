"""The in-process scoring path: Feast online features + the current model + the error-compensation memory.

:class:`Scorer` is what the HTTP service (:mod:`jobs.serve`) wraps; it has no
HTTP in it, so tests and benchmarks drive it directly.

- ``score``: online features of (user, item) from the Feast feature service
  named by the model's registry entry, encoded with the entry's encoder, one
  forward pass -> base probability and last hidden layer, then the memory's
  compensated probability. The request is remembered (bounded) under its
  request id, with its features, key and base prediction, for feedback.
- ``feedback``: the outcome of a remembered request (or a whole event with its
  label) is written into the memory at once, and kept in a bounded buffer of
  recent outcomes.
- ``reload``: when the registry's current version changes, the new model is
  loaded and its memory rebuilt from the buffer of recent outcomes (keys in the
  new hidden space) *beside* the serving one; then one reference is swapped,
  so requests in flight finish on the old bundle and none is dropped. A version
  that fails to load keeps the old one serving (and is reported).


The causal clock, as serving checks it before every batch:

>>> from types import SimpleNamespace
>>> b = SimpleNamespace(version="v000002", entry=SimpleNamespace(training_range={"trained_until_ts": 100}))
>>> check_causal(b, [101, 150])
>>> check_causal(b, [100])
Traceback (most recent call last):
...
jobs.scoring.CausalityError: version v000002 learned events up to ts=100 but would serve an event at ts=100: ...
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from jobs.registry import ModelRegistry, RegistryError, load_model
from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.errors import ReloopError
from online_models.memory import SERVING_MEMORY, ErrorCompensationMemory, Hashed, write_groups
from online_models.models import MEMORY_KEYS, memory_key, memory_key_dim, predict_table, predict_with_hidden
from pipelines.feast_io import batch_feature_refs

log = logging.getLogger("reloop.serve")
_STR_LIST = pa.list_(pa.string())


class ScoringError(ReloopError, RuntimeError):
    """A request that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ScorerConfig:
    """How the scorer behaves; the constructor is the whole configuration."""

    use_memory: bool = True
    # MemoryConfig fields except dim, plus the key kind (see load_bundle)
    memory: dict[str, Any] = field(default_factory=lambda: dict(SERVING_MEMORY))
    outcome_buffer: int = 20_000  # recent outcomes kept to rebuild the memory for a new model
    remembered_requests: int = 100_000
    poll_seconds: float = 0.5  # how often the registry's current pointer is read


class FeastLookup:
    """Online features of (user, item) pairs from a Feast feature service, in one ``get_online_features`` call.

    The service's views are looked up as declared (e.g. ``ctr_dcnv2_side_v1`` holds the streaming views and the
    batch views ``user_profile`` / ``item_catalog``). :meth:`for_fields` adds the batch-view features a
    model's encoder reads that its service lacks, as feature refs of the same call. Where an entity has no
    row, a scalar feature is None (the encoder's "missing": bucket 0 for a category, the mean for a number)
    and a list feature (a bag such as ``genres``, ``user_last_items``) is the empty list; list features are
    always typed ``list<string>``, so a slate of unknown items encodes like any other.
    """

    def __init__(self, store: Any, feature_service: str, extra_refs: tuple[str, ...] = ()) -> None:
        self.store = store
        self.feature_service_name = feature_service
        try:
            self.service = store.get_feature_service(feature_service)
        except Exception as e:  # Feast raises its own FeatureServiceNotFoundException
            raise ScoringError(
                f"Feast feature service {feature_service!r} not found in {store.repo_path}: {e}", 503
            ) from e
        self.extra_refs = tuple(extra_refs)
        refs = [f"{p.name_to_use()}:{f.name}" for p in self.service.feature_view_projections for f in p.features]
        self.features: Any = self.service if not self.extra_refs else refs + list(self.extra_refs)
        views = {p.name: list(p.features) for p in self.service.feature_view_projections}
        for ref in self.extra_refs:
            view = ref.split(":", 1)[0]
            if view not in views:
                views[view] = list(store.get_feature_view(view).features)
        # Feast's list dtypes (Array(String), ...) are the value types named *_LIST
        self.list_features = frozenset(
            f.name for fs in views.values() for f in fs if f.dtype.to_value_type().name.endswith("_LIST")
        )
        self.names = frozenset(f.name for fs in views.values() for f in fs)

    def for_fields(self, fields: Any) -> FeastLookup:
        """This lookup, plus the batch-view features among ``fields`` (a model's encoder fields) it lacks."""

        missing = tuple(r for r in batch_feature_refs(fields) if r.split(":", 1)[1] not in self.names)
        if not missing:
            return self
        return FeastLookup(self.store, self.feature_service_name, self.extra_refs + missing)

    def lookup_dict(self, users: list[str], items: list[str]) -> dict[str, Any]:
        """Feature name -> values (None where the store has no value; list features as typed arrays with the
        empty list for no value), plus the entity keys."""
        rows = [{"user_id": u, "item_id": i} for u, i in zip(users, items)]
        got = self.store.get_online_features(features=self.features, entity_rows=rows).to_dict()
        for name in self.list_features & got.keys():
            got[name] = pa.array([[] if v is None else v for v in got[name]], _STR_LIST)
        return got

    def lookup(self, users: list[str], items: list[str]) -> pa.Table:
        return pa.table(self.lookup_dict(users, items))


@dataclass
class Bundle:
    """Everything one model version serves with; swapped as a whole."""

    version: str
    model: torch.nn.Module
    encoder: Any
    memory: Any
    lookup: Any
    loaded_at: float = field(default_factory=time.time)
    entry: Any = None  # the registry entry (manifest) it was loaded from
    memory_key: str = SERVING_MEMORY["key"]  # what keys the memory: see online_models.models.memory_key

    def key(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """The memory's key of encoded rows whose last hidden layer is ``hidden``."""

        return memory_key(self.model, batch, hidden, self.memory_key)


def load_bundle(
    registry: ModelRegistry, version: str, memory: dict[str, Any], lookup_for: Callable[[str], Any] | None = None
) -> Bundle:
    """Model, encoder and a fresh memory of one registry version: what serving swaps in as a whole.

    ``memory`` holds the memory's hyper-parameters and optionally ``key`` (one of ``MEMORY_KEYS``, see
    :func:`online_models.models.memory_key`; when absent, the serving default ``SERVING_MEMORY["key"]``);
    its ``dim`` comes from the model and the key. ``lookup_for`` maps the version's feature service to an
    online-feature lookup (None where features come with the rows).
    """

    entry, model = load_model(registry, version)
    enc = entry.extra.get("encoder")
    if not enc:
        raise RegistryError(f"{registry.uri}: version {version} has no encoder config (extra.encoder)")
    key = memory.get("key", SERVING_MEMORY["key"])
    if key not in MEMORY_KEYS:
        raise ValueError(f"memory key must be one of {', '.join(MEMORY_KEYS)}, got {key!r}")
    params = {k: v for k, v in memory.items() if k not in ("dim", "key")}
    encoder = FeatureEncoder(EncoderConfig.from_dict(enc))
    lookup = lookup_for(entry.feature_service) if lookup_for else None
    if hasattr(lookup, "for_fields"):  # the batch features the encoder reads come with the same Feast call
        ec = encoder.config
        lookup = lookup.for_fields((*ec.categorical_fields, *ec.numeric_fields, *ec.bag_fields))
    return Bundle(
        version,
        model,
        encoder,
        ErrorCompensationMemory(dim=memory_key_dim(model, key), **params),
        lookup,
        entry=entry,
        memory_key=key,
    )


class CausalityError(ReloopError, RuntimeError):
    """A version was about to serve an event at or before the newest event time it learned from."""


def horizon_of(entry: Any) -> int | None:
    """``trained_until_ts`` of a registry entry: the event time of the newest example it learned (None if the
    manifest does not say, e.g. a version published by hand)."""
    ts = (getattr(entry, "training_range", None) or {}).get("trained_until_ts")
    return None if ts is None else int(ts)


def check_causal(bundle: Bundle, ts: Any) -> None:
    """Fail loudly unless every event of ``ts`` lies strictly after what ``bundle`` learned."""
    horizon = horizon_of(bundle.entry)
    if horizon is None:
        raise CausalityError(
            f"version {bundle.version} has no trained_until_ts in its manifest: "
            f"cannot prove it learned nothing from the events it would serve"
        )
    first = int(min(ts))
    if first <= horizon:
        raise CausalityError(
            f"version {bundle.version} learned events up to ts={horizon} but would serve an "
            f"event at ts={first}: a leak from the future"
        )


def score_rows(
    bundle: Bundle, table: pa.Table, learn: bool, write_mode: str = "timestamp", use_memory: bool = True
) -> tuple[Any, Any]:
    """The batch serving step: base probabilities and memory-compensated ones of ``table``'s rows.

    With ``learn`` every row's label is written into the memory as it arrives: rows of one timestamp
    are scored together and written before any later row is scored (``write_mode``, see
    :func:`online_models.memory.write_groups`). This is the only place the serving path touches the memory
    per event, so batching its writes differently is a change here alone. Returns numpy float64 arrays.
    """

    batch = bundle.encoder.encode(table)
    p_base, hidden = predict_with_hidden(bundle.model, batch)
    with torch.no_grad():
        if not use_memory:
            p_mem = p_base
        elif learn:
            key = bundle.key(batch, hidden)
            p_mem = bundle.memory.step(key, p_base, batch["label"], write_groups(table["ts"].to_numpy(), write_mode))
        else:
            p_mem = bundle.memory.estimate(bundle.key(batch, hidden), p_base)
    return p_base.numpy().astype(np.float64), p_mem.numpy().astype(np.float64)


def base_predictions(bundle: Bundle, table: pa.Table, batch_size: int = 4096) -> Any:
    """The base model's probabilities of ``table``'s rows (no memory): shadows and the deployment gate."""
    return predict_table(bundle.model, bundle.encoder, table, batch_size).astype(np.float64)


def serve_timeline(bundle: Bundle, table: pa.Table, write: Any) -> tuple[Any, Any]:
    """Serving under delayed labels: ``table``'s rows are a time-ordered timeline of two kinds of step.

    A row with ``write[i]`` False is an impression served: scored with the memory as it stands then. A row
    with ``write[i]`` True is an outcome arriving (its label): written into the memory, keyed by this
    model's hidden vector of the impression's features, recomputed now (an outcome that arrives after a
    model swap is keyed in the new model's space, like the rebuild). One forward pass for the whole
    timeline; each run of consecutive impressions is estimated at once and each run of outcomes written
    at once, which is exact: nothing between two steps of a run changes the memory. Returns numpy float64
    ``(p_base, p_mem)``; ``p_mem`` of an outcome row is its base probability (nothing was served).
    """

    write = np.asarray(write, bool)
    batch = bundle.encoder.encode(table)
    p_base, hidden = predict_with_hidden(bundle.model, batch)
    with torch.no_grad():
        p_mem = p_base.clone()
        mem = bundle.memory
        key = bundle.key(batch, hidden)
        hashed = mem.hash(key)
        edges = [0, *(np.flatnonzero(np.diff(write.astype(np.int8))) + 1).tolist(), len(write)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi <= lo:
                continue
            part = Hashed(hashed.index[lo:hi], hashed.proj[lo:hi])
            if write[lo]:
                mem.write(key[lo:hi], batch["label"][lo:hi], p_base[lo:hi], part, each=True)
            else:
                p_mem[lo:hi] = mem.estimate(key[lo:hi], p_base[lo:hi], part)
    return p_base.numpy().astype(np.float64), p_mem.numpy().astype(np.float64)


def rebuild_memory(bundle: Bundle, recent: pa.Table | None) -> int:
    """Reset ``bundle``'s memory and write the recent labelled rows keyed in its own hidden space (a new model
    is swapped in: the old keys mean nothing to it). Returns the rows written."""
    if recent is None or recent.num_rows == 0:
        bundle.memory.reset()
        return 0
    return bundle.memory.rebuild([bundle.encoder.encode(recent)], bundle.model, key_fn=bundle.key)


@dataclass
class Remembered:
    version: str
    row: pa.Table  # the features the request was scored with (one row)
    key: torch.Tensor  # (1, D): the memory's key the request was scored with
    base: float


class ScoredSlate:
    """What a slate was scored with, held once for all its candidates: the features (one row each), the memory's
    keys (N, D) and the base predictions."""

    __slots__ = ("version", "table", "keys", "bases")

    def __init__(self, version: str, table: pa.Table, keys: torch.Tensor, bases: list[float]) -> None:
        self.version, self.table, self.keys, self.bases = version, table, keys, bases

    def candidate(self, i: int) -> SlateCandidate:
        return SlateCandidate(self, i)


class SlateCandidate:
    """One candidate of a :class:`ScoredSlate`, read like :class:`Remembered`; sliced out only when its
    outcome arrives, so an issued impression costs one small object (a table slice and a tensor view per
    candidate cost ~9 ms per 1,000-candidate slate, on every slate, for the few outcomes that ever come)."""

    __slots__ = ("slate", "index")

    def __init__(self, slate: ScoredSlate, index: int) -> None:
        self.slate, self.index = slate, index

    @property
    def version(self) -> str:
        return self.slate.version

    @property
    def row(self) -> pa.Table:
        return self.slate.table.slice(self.index, 1)

    @property
    def key(self) -> torch.Tensor:
        return self.slate.keys[self.index : self.index + 1]

    @property
    def base(self) -> float:
        return self.slate.bases[self.index]


class Scorer:
    """Score with the registry's current model + memory; learn from feedback; swap models live."""

    def __init__(
        self, registry: ModelRegistry, lookup_factory: Callable[[str], Any], config: ScorerConfig = ScorerConfig()
    ) -> None:
        self.registry = registry
        self.lookup_factory = lookup_factory
        self.config = config
        self.bundle: Bundle | None = None
        self._lookups: dict[str, Any] = {}
        self._schemas: dict[tuple[str, ...], pa.Schema] = {}
        self._remembered: collections.OrderedDict[str, Remembered] = collections.OrderedDict()
        self._outcomes: collections.deque[tuple[int, pa.Table, int]] = collections.deque(maxlen=config.outcome_buffer)
        self._outcome_seq = 0
        self._lock = threading.Lock()  # memory writes/reads, remembered requests, outcome buffer
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.last_reload_error: str | None = None
        self.stats = collections.Counter()

    # ---- model lifecycle -------------------------------------------------------------------------
    def _lookup(self, feature_service: str) -> Any:
        if feature_service not in self._lookups:
            self._lookups[feature_service] = self.lookup_factory(feature_service)
        return self._lookups[feature_service]

    def _load(self, version: str) -> Bundle:
        return load_bundle(self.registry, version, self.config.memory, self._lookup)

    def reload(self) -> bool:
        """Switch to the registry's current version if it changed; True if a new model now serves."""
        with self._reload_lock:
            try:
                current = self.registry.current()
            except RegistryError as e:
                self.last_reload_error = str(e)
                return False
            if current is None or (self.bundle is not None and self.bundle.version == current):
                return False
            try:
                new = self._load(current)
            except (RegistryError, ScoringError, ValueError, KeyError, RuntimeError) as e:
                self.last_reload_error = (
                    f"version {current} not deployed, keeping {self.bundle and self.bundle.version}: {e}"
                )
                log.error(self.last_reload_error)
                self.stats["reload_failures"] += 1
                return False
            # rebuild the memory in the new hidden space from recent outcomes, outside the request lock
            with self._lock:
                snapshot = list(self._outcomes)
            new.memory.reset()
            self._write_outcomes(new, snapshot)
            upto = snapshot[-1][0] if snapshot else 0
            with self._lock:
                # outcomes that arrived during the rebuild, then the swap: nothing is lost
                self._write_outcomes(new, [o for o in self._outcomes if o[0] > upto])
                self.bundle = new
            self.last_reload_error = None
            self.stats["reloads"] += 1
            log.info("serving model %s (memory rebuilt from %d outcomes)", current, len(snapshot))
            return True

    def _write_outcomes(self, bundle: Bundle, outcomes: list[tuple[int, pa.Table, int]]) -> None:
        """Write buffered outcomes into ``bundle``'s memory, keyed by its model (one batched forward pass)."""
        if not outcomes:
            return
        try:
            rows = pa.concat_tables([o[1] for o in outcomes], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # a context field with different types across requests: write those rows one by one
            for o in outcomes:  # one table never needs promotion, so this cannot recurse further
                self._write_outcomes(bundle, [o])
            return
        batch = bundle.encoder.encode(rows)
        labels = torch.tensor([o[2] for o in outcomes], dtype=torch.float32)
        p, hidden = predict_with_hidden(bundle.model, batch)
        with torch.no_grad():
            bundle.memory.write(bundle.key(batch, hidden), labels, p)

    def start(self) -> None:
        """Load the current model (if any) and poll the registry in a background thread."""
        self.reload()
        self._poller = threading.Thread(target=self._poll, name="registry-poller", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.reload()
            except Exception:  # never let the poller die: the old model keeps serving
                log.exception("registry poll failed")

    def close(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=5)

    # ---- scoring and feedback --------------------------------------------------------------------
    def _features(self, bundle: Bundle, user_id: str, item_id: str, context: dict[str, Any]) -> pa.Table:
        """One row: the ids, the request's context, then the online features (context wins on a clash)."""
        row: dict[str, list] = {"user_id": [user_id], "item_id": [item_id]}
        for k, v in context.items():
            row.setdefault(k, [v])
        for k, v in bundle.lookup.lookup_dict([user_id], [item_id]).items():
            row.setdefault(k, v)
        return self._table(row)

    def _table(self, row: dict[str, list]) -> pa.Table:
        # type inference over ~30 columns costs more than the model: reuse the schema of the same columns
        key = tuple(row)
        schema = self._schemas.get(key)
        if schema is not None:
            try:
                return pa.Table.from_pydict(row, schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass  # a context value of another type: infer this one
        table = pa.table(row)
        if len(self._schemas) < 256 and not any(pa.types.is_null(f.type) for f in table.schema):
            self._schemas[key] = table.schema
        return table

    def _forward(self, bundle: Bundle, row: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        """Base probability and the memory's key of one encoded row."""
        batch = bundle.encoder.encode(row)
        p, hidden = predict_with_hidden(bundle.model, batch)
        with torch.no_grad():
            return p, bundle.key(batch, hidden)

    def score(
        self, user_id: str, item_id: str, context: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        """Score one request; the answer names the model version and the request id to send feedback for."""
        bundle = self.bundle
        if bundle is None:
            raise ScoringError(f"no model is deployed yet (registry {self.registry.uri} has no current version)", 503)
        row = self._features(bundle, user_id, item_id, context or {})
        base, key = self._forward(bundle, row)
        comp = base
        if self.config.use_memory:
            with self._lock:
                comp = bundle.memory.estimate(key, base)
        rid = request_id or uuid.uuid4().hex
        with self._lock:
            self._remembered[rid] = Remembered(bundle.version, row, key, float(base[0]))
            if len(self._remembered) > self.config.remembered_requests:
                self._remembered.popitem(last=False)
        self.stats["scored"] += 1
        return {
            "request_id": rid,
            "probability": float(comp[0]),
            "base_probability": float(base[0]),
            "model_version": bundle.version,
        }

    def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        """Write the outcome of a scored request into the memory now; 404 if the id is unknown or expired."""
        with self._lock:
            rec = self._remembered.pop(request_id, None)
        if rec is None:
            raise ScoringError(
                f"unknown request_id {request_id!r} (never scored here, already answered, "
                f"or older than the last {self.config.remembered_requests} requests)",
                404,
            )
        return self._write(rec.row, label, rec)

    def feedback_event(
        self, user_id: str, item_id: str, label: int, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the outcome of an event that was not scored here (features looked up now)."""
        bundle = self.bundle
        if bundle is None:
            raise ScoringError("no model is deployed yet", 503)
        return self._write(self._features(bundle, user_id, item_id, context or {}), label, None)

    def _write(self, row: pa.Table, label: int, rec: Remembered | SlateCandidate | None) -> dict[str, Any]:
        # under the lock: a model swap cannot slip between choosing the memory and writing into it
        with self._lock:
            bundle = self.bundle
            if rec is not None and rec.version == bundle.version:
                key, base = rec.key, torch.tensor([rec.base])
            else:  # scored by another version (or not at all): key it in the serving model's hidden space
                base, key = self._forward(bundle, row)
            bundle.memory.write(key, torch.tensor([float(label)]), base)
            self._outcome_seq += 1
            self._outcomes.append((self._outcome_seq, row, int(label)))
        self.stats["feedback"] += 1
        return {"written": True, "model_version": bundle.version}

    def health(self) -> dict[str, Any]:
        b = self.bundle
        return {
            "model_version": b.version if b else None,
            "use_memory": self.config.use_memory,
            "outcomes_buffered": len(self._outcomes),
            "last_reload_error": self.last_reload_error,
            **{k: int(v) for k, v in self.stats.items()},
        }
