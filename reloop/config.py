"""The one typed config of reloop, validated on load.

Every section defaults to the embedded profile (local Kafka, SQLite Feast,
local Ray, local directories), so an empty file, or none, is a valid config.
Unknown keys are errors that name the key and the file. Secrets are never in
the file: fields ending in ``_env`` name the environment variable to read.

>>> cfg = ReloopConfig()
>>> cfg.kafka.bootstrap_servers, cfg.feast.profile
('127.0.0.1:9092', 'sqlite')
>>> ReloopConfig.model_validate({"kafka": {"bootstrap": "x"}})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for ReloopConfig
kafka.bootstrap
  Extra inputs are not permitted ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _local(env: str, default: int) -> str:
    # the embedded services' ports can be moved with the same variables reloop.services reads
    return f"127.0.0.1:{os.environ.get(env, default)}"


class KafkaConfig(Strict):
    bootstrap_servers: str = Field(default_factory=lambda: _local("RELOOP_KAFKA_PORT", 9092))
    events_topic: str = "reloop.events"
    dlq_topic: str = "reloop.events.dlq"
    #: contract v2: impressions (key = user id) and their delayed feedback (key = impression id)
    impressions_topic: str = "reloop.impressions"
    feedback_topic: str = "reloop.feedback"
    alerts_topic: str = "reloop.alerts"
    partitions: int = Field(4, ge=1)
    consumer_group: str = "reloop-features"
    #: passed through to kafka-python clients: security_protocol, sasl_mechanism, ssl_cafile, ...
    security: dict[str, str] = Field(default_factory=dict)
    #: name of the environment variable holding the SASL password (never the password itself)
    sasl_password_env: str | None = None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for any kafka-python client (bootstrap + security pass-through)."""
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(","), **self.security}
        if self.sasl_password_env:
            try:
                opts["sasl_plain_password"] = os.environ[self.sasl_password_env]
            except KeyError:
                raise ConfigError(f"kafka.sasl_password_env: environment variable {self.sasl_password_env} "
                                  f"is not set") from None
        return opts


class FeastConfig(Strict):
    #: sqlite = embedded online store; redis = production profile (infra Redis or your own)
    profile: Literal["sqlite", "redis"] = "sqlite"
    repo_path: str = "features"
    redis_connection_string: str = Field(default_factory=lambda: _local("RELOOP_REDIS_PORT", 6399))


class RayConfig(Strict):
    #: None: a local ``ray.init()``; "auto" or "ray://host:10001" or "host:port" for a cluster
    address: str | None = None
    #: the dashboard/jobs address for ``ray job submit``
    jobs_address: str = Field(default_factory=lambda: "http://" + _local("RELOOP_RAY_DASHBOARD_PORT", 8265))


class StorageConfig(Strict):
    #: where the model registry lives: a local path or any pyarrow.fs / fsspec URI
    registry_uri: str = ".state/registry"
    #: where the feature job writes training examples (partitioned Parquet)
    examples_uri: str = ".state/examples"
    #: where reports and evaluation results go
    reports_dir: str = "reports"


class FeatureJobConfig(Strict):
    """The Beam feature job (``pipelines.feature_job``); windows and smoothing are in ``pipelines.aggregates``."""

    #: feature-state snapshots and pending run plans: a local path or any pyarrow.fs URI
    state_uri: str = ".state/feature_job"
    #: cap on the events of one micro-batch (None: everything up to the log end)
    max_events_per_run: int | None = Field(None, ge=1)
    #: events older than (newest event time - allowed lateness) are dropped and counted
    allowed_lateness_s: float = Field(3600.0, ge=0)
    #: records per Arrow batch read from Kafka, and offsets per initial split of a partition range
    read_batch_size: int = Field(5000, ge=1)
    split_size: int = Field(50_000, ge=1)
    #: contract v2: how long after an impression a click still counts (event time); the join closes the
    #: window then and emits the negative
    attribution_window_s: float = Field(3600.0, gt=0)
    #: contract v2: how long closed impressions are remembered, to tell a late click from an orphan
    closed_retention_s: float = Field(7 * 86400.0, ge=0)


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
    from reloop.drift.defaults import DEFAULT_MONITORS

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


class ReloopConfig(Strict):
    kafka: KafkaConfig = KafkaConfig()
    feast: FeastConfig = FeastConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    feature_job: FeatureJobConfig = FeatureJobConfig()
    hooks: HooksConfig = HooksConfig()
    drift: DriftConfig = DriftConfig()


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the file and field."""


def load_config(path: str | Path | None = None) -> ReloopConfig:
    """Load and validate a YAML config; ``None`` gives the embedded defaults."""
    if path is None:
        return ReloopConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return ReloopConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: {loc}: {what}")
        raise ConfigError("\n".join(lines)) from None
