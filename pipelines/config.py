"""The config sections of the stream layer (Kafka, Feast, storage, the feature job), validated on load.

The whole config file is composed at the top (:class:`reloop.config.ReloopConfig`);
each layer declares and reads only its own sections, so ``python -m pipelines.feature_job
--config prod.yaml`` reads the same file as ``reloop run --config prod.yaml``. Every
section defaults to the embedded profile, so an empty file, or none, is a valid config.
Unknown keys inside a section are errors that name the key and the file. Secrets are
never in the file: fields ending in ``_env`` name the environment variable to read.

>>> cfg = PipelineConfig()
>>> cfg.kafka.bootstrap_servers.startswith("127.0.0.1:"), cfg.feast.profile
(True, 'sqlite')
>>> KafkaConfig.model_validate({"bootstrap": "x"})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for KafkaConfig
bootstrap
  Extra inputs are not permitted ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from online_models.errors import ConfigError


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
                raise ConfigError(
                    f"kafka.sasl_password_env: environment variable {self.sasl_password_env} is not set"
                ) from None
        return opts


class FeastConfig(Strict):
    #: sqlite = embedded online store; redis = production profile (infra Redis or your own)
    profile: Literal["sqlite", "redis"] = "sqlite"
    repo_path: str = "features"
    redis_connection_string: str = Field(default_factory=lambda: _local("RELOOP_REDIS_PORT", 6399))
    #: environment variable holding the Redis password (production); without it, the local service's
    #: generated password (``$RELOOP_STATE_DIR/redis/password``) is used when the file exists
    redis_password_env: str | None = None


class StorageConfig(Strict):
    #: where the model registry lives: a local path or any pyarrow.fs / fsspec URI
    registry_uri: str = ".state/registry"
    #: where the feature job writes training examples (partitioned Parquet)
    examples_uri: str = ".state/examples"
    #: where the incremental trainer checkpoints and Ray Train keeps its runs (``<uri>/ray_train``)
    trainer_uri: str = ".state/trainer"
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
    #: events further ahead of their partition's recent event times are dead-lettered (pipelines.aggregates)
    max_ahead_s: float = Field(7 * 86400.0, gt=0)
    #: records per Arrow batch read from Kafka, and offsets per initial split of a partition range
    read_batch_size: int = Field(5000, ge=1)
    split_size: int = Field(50_000, ge=1)
    #: contract v2: how long after an impression a click still counts (event time); the join closes the
    #: window then and emits the negative
    attribution_window_s: float = Field(3600.0, gt=0)
    #: contract v2: how long closed impressions are remembered, to tell a late click from an orphan
    closed_retention_s: float = Field(7 * 86400.0, ge=0)
    #: contract v2: a partition with no records for this long (processing time) stops holding the join's
    #: watermark back (Flink's idleness); until then every partition of both topics holds it
    idle_timeout_s: float = Field(60.0, ge=0)
    #: the Beam runner of ``reloop run``'s micro-batches: None = Beam's local runner; "flink" = the local
    #: Flink job server (``reloop up flink``), or a Flink cluster with ``--flink_master`` in pipeline_args
    runner: str | None = None
    #: more Beam flags, e.g. ["--parallelism=2"] or ["--flink_master=jm:8081"]
    pipeline_args: list[str] = Field(default_factory=list)


class PipelineConfig(Strict):
    """The sections the feature job and the Kafka tools read."""

    kafka: KafkaConfig = KafkaConfig()
    feast: FeastConfig = FeastConfig()
    storage: StorageConfig = StorageConfig()
    feature_job: FeatureJobConfig = FeatureJobConfig()


C = TypeVar("C", bound=Strict)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; :class:`ConfigError` naming the file otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def validate_config(schema: type[C], data: dict[str, Any], path: str | Path) -> C:
    """``schema`` validated from ``data``; every error line names the file and the field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: {loc}: {what}")
        raise ConfigError("\n".join(lines)) from None


def load_sections(schema: type[C], path: str | Path | None) -> C:
    """The sections of ``schema`` from a config file (``None``: the defaults).

    Sections of higher layers are left to them: the top (``reloop.config.load_config``)
    rejects a section nobody declares.
    """
    if path is None:
        return schema()
    data = read_config_file(path)
    return validate_config(schema, {k: v for k, v in data.items() if k in schema.model_fields}, path)


def load_pipeline_config(path: str | Path | None = None) -> PipelineConfig:
    """The stream layer's sections of a config file."""
    return load_sections(PipelineConfig, path)
