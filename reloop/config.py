"""The one config file of reloop, composed from the sections each layer declares, validated on load.

Sections: ``kafka``, ``feast``, ``storage``, ``feature_job`` (:mod:`pipelines.config`),
``ray``, ``hooks``, ``drift`` (:mod:`jobs.config`). Every section defaults to the
embedded profile (local Kafka, SQLite Feast, local Ray, local directories), so an empty
file, or none, is a valid config. Unknown keys are errors that name the key and the file.
Secrets are never in the file: fields ending in ``_env`` name the environment variable to read.

>>> cfg = ReloopConfig()
>>> cfg.kafka.bootstrap_servers.startswith("127.0.0.1:"), cfg.feast.profile
(True, 'sqlite')
>>> ReloopConfig.model_validate({"kafka": {"bootstrap": "x"}})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for ReloopConfig
kafka.bootstrap
  Extra inputs are not permitted ...
"""

from __future__ import annotations

from pathlib import Path

from jobs.config import JobsConfig
from pipelines.config import read_config_file, validate_config


class ReloopConfig(JobsConfig):
    """Every section of the config file; a top-level key no layer declares is an error."""


def load_config(path: str | Path | None = None) -> ReloopConfig:
    """Load and validate a YAML config; ``None`` gives the embedded defaults."""
    if path is None:
        return ReloopConfig()
    return validate_config(ReloopConfig, read_config_file(path), path)
