"""The config sections of the job layer (Ray, alert hooks, drift monitors and policy), validated on load.

They extend the stream layer's sections (:class:`pipelines.config.PipelineConfig`);
the top composes the whole file (:class:`reloop.config.ReloopConfig`).

>>> JobsConfig().drift.policy.min_evidence
2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from online_models.drift.defaults import DEFAULT_MONITORS
from online_models.settings import KINDS, MEMORY_KEYS, MODEL_ARCH, SERVING_MEMORY
from pipelines.config import PipelineConfig, Strict, _local, load_sections


class RayConfig(Strict):
    #: None: a local ``ray.init()``; "auto" or "ray://host:10001" or "host:port" for a cluster
    address: str | None = None
    #: the dashboard/jobs address for ``ray job submit``
    jobs_address: str = Field(default_factory=lambda: "http://" + _local("RELOOP_RAY_DASHBOARD_PORT", 8265))
    #: extra resources the incremental trainer actor asks for, e.g. {"reloop_worker_1": 1} to place it on
    #: the node that has that custom resource
    trainer_resources: dict[str, float] = Field(default_factory=dict)
    #: the retrain's Ray Train workers, and how their bundles are placed (STRICT_SPREAD: one per node)
    retrain_workers: int = Field(1, ge=1)
    retrain_placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


class WebhookConfig(Strict):
    url: str
    #: name of the environment variable holding the HMAC secret (never the secret itself)
    secret_env: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    #: attempts after the first one
    retries: int = Field(3, ge=0)
    #: first backoff; doubles per retry up to backoff_max_s
    backoff_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)


class HooksConfig(Strict):
    """Where alerts go (several at once); a failing hook never stops monitoring."""

    webhooks: list[WebhookConfig] = Field(default_factory=list)
    #: publish every alert and audit record on kafka.alerts_topic
    kafka_enabled: bool = True
    #: None: kafka.alerts_topic
    kafka_topic: str | None = None
    #: ``module:function`` callables, each called with the alert dict
    python: list[str] = Field(default_factory=list)
    #: JSONL log of alerts that could not be delivered
    dead_letter_path: str = ".state/alerts.deadletter.jsonl"
    #: deliver from a background thread so a slow endpoint never blocks the monitor loop
    background: bool = True


class MonitorSpec(Strict):
    #: adwin, page_hinkley, kswin, ddm, eddm, hddm_a, hddm_w, psi, ks
    kind: str
    #: logloss, error, click, prediction, or the name of a numeric feature
    metric: str = "logloss"
    #: the detector's own parameters (River constructor args; PSI/KS: mode, bins, reference_size, ...)
    params: dict[str, Any] = Field(default_factory=dict)
    warmup: int = Field(1000, ge=0)
    name: str | None = None


def _default_monitors() -> list[MonitorSpec]:
    return [MonitorSpec(**m) for m in DEFAULT_MONITORS]


class DriftPolicyConfig(Strict):
    min_evidence: int = Field(2, ge=1)
    evidence_window: int = Field(5000, ge=0)
    cooldown_events: int = Field(5_000, ge=0)
    clear_after: int = Field(5_000, ge=0)
    alert_on_warning: bool = True
    rollback_margin: float = Field(0.02, ge=0)
    rollback_z: float = Field(2.0, ge=0)
    watch_min_events: int = Field(2000, ge=0)
    watch_events: int = Field(20_000, ge=0)


class DriftConfig(Strict):
    #: served predictions joined with labels (JSON: event_id, ts, user_id, item_id, p_base, p, label,
    #: model_version, numeric features)
    predictions_topic: str = "reloop.predictions"
    consumer_group: str = "reloop-monitor"
    monitors: list[MonitorSpec] = Field(default_factory=_default_monitors)
    #: numeric features that also get distribution tests (``feature_tests``) against a reference window
    features: list[str] = Field(default_factory=list)
    feature_tests: list[Literal["psi", "ks"]] = Field(default_factory=lambda: ["psi"])
    policy: DriftPolicyConfig = DriftPolicyConfig()
    #: monitor + policy checkpoint (JSON) and the audit log (JSONL)
    state_path: str = ".state/monitor/state.json"
    audit_log_path: str = ".state/monitor/audit.jsonl"
    checkpoint_every: int = Field(10_000, ge=1)


_M = SERVING_MEMORY


class MemorySection(Strict):
    """The error-compensation memory of the serving path (``reloop run``, ``reloop serve``).

    Defaults: :data:`online_models.settings.SERVING_MEMORY`, chosen on the evaluation's validation slot.
    """

    #: what keys the memory: "hidden" (the model's last layer, as in ReLoop2), "hidden+user", "hidden+ids"
    key: Literal[MEMORY_KEYS] = _M["key"]  # type: ignore[valid-type]
    num_tables: int = Field(_M["num_tables"], ge=1)
    bits: int = Field(_M["bits"], ge=1, le=24)
    tau: float = Field(_M["tau"], gt=0)
    gamma: float = Field(_M["gamma"], ge=0, le=1)
    lam: float = Field(_M["lam"], ge=0)
    shrinkage: float = Field(_M["shrinkage"], ge=0)
    eps: float = Field(_M["eps"], ge=0)
    decay: float = Field(_M["decay"], gt=0, le=1)

    def settings(self) -> dict[str, Any]:
        """The memory settings as the serving path takes them (``ScorerConfig.memory``)."""
        return self.model_dump()


_A = MODEL_ARCH


class ModelSection(Strict):
    """The model every job builds: the incremental trainer, the retrain (``reloop run``, ``python -m jobs.trainer``).

    Defaults: :data:`online_models.settings.MODEL_ARCH`, the evaluation's choice on its validation slot. The
    fields a model reads come from the data (:func:`online_models.models.model_config_for`); these are the rest.
    A registry version records its whole model config, so changing this section changes new models only.
    """

    kind: Literal[KINDS] = "dcnv2"  # type: ignore[valid-type]
    hash_buckets: int = Field(_A["hash_buckets"], ge=2)
    embedding_dim: int = Field(_A["embedding_dim"], ge=1)
    hidden_sizes: tuple[int, ...] = Field(_A["hidden_sizes"], min_length=1)
    cross_layers: int = Field(_A["cross_layers"], ge=0)
    dropout: float = Field(_A["dropout"], ge=0, lt=1)
    embedding_l2: float = Field(_A["embedding_l2"], ge=0)

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(h < 1 for h in v):
            raise ValueError(f"every hidden size must be >= 1, got {list(v)}")
        return v

    def architecture(self) -> dict[str, Any]:
        """What :func:`online_models.models.model_config_for` takes as ``arch`` (JSON-able, for Ray)."""
        d = self.model_dump(exclude={"kind", "hash_buckets"})
        d["hidden_sizes"] = list(d["hidden_sizes"])
        return d


class TrainerSection(Strict):
    """The incremental trainer of ``reloop run`` (:class:`jobs.trainer.TrainerConfig`).

    The optimizer defaults are the evaluation's (``reloop evaluate``, chosen on its validation slot);
    ``refresh_every`` examples between checkpoints offered to serving (``benchmarks/bench_refresh_cadence.py``);
    the first model learns ``bootstrap`` examples before it may serve (they are never scored).
    """

    batch_size: int = Field(256, ge=1)
    optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    refresh_every: int = Field(1000, ge=100)
    bootstrap: int = Field(5000, ge=1)
    #: side features (``reloop run --side-features``): the user profile and item catalogue, joined point in time
    #: onto the examples the trainer, the retrains and serving read, and encoded as fields (bags for genres);
    #: versions are published under the ``ctr_<kind>_side_v<N>`` feature service
    side_features: bool = False


class GateSection(Strict):
    """The deployment gate (:mod:`jobs.deploy`, :mod:`online_models.gate`): a paired block bootstrap on the
    newest ``events`` events neither model learned from, a two-sided ``level`` interval; a retrain must
    beat the served logloss by ``margin`` (a fraction) as well."""

    events: int = Field(1000, ge=100)
    level: float = Field(0.90, gt=0, lt=1)
    margin: float = Field(0.0, ge=0)


class JobsConfig(PipelineConfig):
    """The sections the trainer, retrain, serving and monitor jobs read."""

    ray: RayConfig = RayConfig()
    hooks: HooksConfig = HooksConfig()
    drift: DriftConfig = DriftConfig()
    memory: MemorySection = MemorySection()
    model: ModelSection = ModelSection()
    trainer: TrainerSection = TrainerSection()
    gate: GateSection = GateSection()


def load_jobs_config(path: str | Path | None = None) -> JobsConfig:
    """The job layer's sections of a config file (and the stream layer's beneath them)."""
    return load_sections(JobsConfig, path)
