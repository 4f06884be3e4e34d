"""Open the Feast store of a profile, apply the repo, and write feature snapshots online and offline.

Online writes are upserts keyed by entity (SQLite ``INSERT OR REPLACE``, Redis
``HSET``), so writing the same snapshot twice is harmless. Offline rows go to
one Parquet file per run under the feature view's batch-source directory,
named by the run id, so a re-run overwrites the file instead of appending.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.storage import open_filesystem, write_parquet_atomic
from pipelines.config import FeastConfig

#: feature view names of the repo in features/ (see features/feature_repo.py)
USER_VIEW = "user_stats"
ITEM_VIEW = "item_stats"


#: the Feast repo shipped with reloop (``features/`` beside the packages): found from the installed code
PACKAGE_REPO = Path(__file__).resolve().parent.parent / "features"


def resolve_repo(cfg: FeastConfig, repo_path: str | None = None) -> Path:
    """The Feast repo directory: the configured path if it is a repo, else (for a relative path such as
    the default ``features``) the same path inside the installed reloop, so commands work from any
    directory. Raises ``FileNotFoundError`` naming every place looked at and the file that is missing."""
    path = Path(repo_path or cfg.repo_path)
    want = ("feature_repo.py", yaml_path_name(cfg))
    tried = [path] if path.is_absolute() else [path, PACKAGE_REPO.parent / path]
    for cand in tried:
        if all((cand / w).is_file() for w in want):
            return cand.resolve()
    missing = next(f"{c / w}" for c in tried for w in want if not (c / w).is_file())
    raise FileNotFoundError(f"no Feast repo at {' or '.join(str(c) for c in tried)} (missing {missing}); "
                            f"set feast.repo_path in the config or --feature_repo")


def yaml_path_name(cfg: FeastConfig) -> str:
    return "feature_store.yaml" if cfg.profile == "sqlite" else "feature_store.redis.yaml"


def yaml_path(cfg: FeastConfig, repo_path: str | None = None) -> Path:
    repo = Path(repo_path or cfg.repo_path)
    return repo / yaml_path_name(cfg)


def open_store(cfg: FeastConfig, repo_path: str | None = None):
    """A ``FeatureStore`` for the configured profile (Redis: the connection string comes from ``cfg``)."""
    from feast import FeatureStore
    from feast.repo_config import load_repo_config

    repo = resolve_repo(cfg, repo_path)
    config = load_repo_config(repo, yaml_path(cfg, str(repo)))
    if cfg.profile == "redis":
        config.online_store.connection_string = redis_connection_string(cfg)
    return FeatureStore(repo_path=str(repo), config=config)


def redis_connection_string(cfg: FeastConfig) -> str:
    """``cfg.redis_connection_string`` with its password: from ``$<redis_password_env>`` when configured
    (a missing variable is a :class:`ValueError` naming it), else the local service's generated one."""
    import os

    conn = cfg.redis_connection_string
    if "password=" in conn:
        return conn
    password = None
    if cfg.redis_password_env:
        password = os.environ.get(cfg.redis_password_env)
        if not password:
            raise ValueError(f"feast.redis_password_env: environment variable {cfg.redis_password_env} is not set")
    else:
        local = Path(os.environ.get("RELOOP_STATE_DIR", ".state")) / "redis" / "password"
        if local.exists():
            password = local.read_text().strip()
    return f"{conn},password={password}" if password else conn


def repo_objects(repo_path: str | Path) -> list:
    """The Feast declarations of ``<repo>/feature_repo.py``, imported by path (works for copies of the repo)."""
    import importlib.util
    import uuid

    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    path = Path(repo_path) / "feature_repo.py"
    spec = importlib.util.spec_from_file_location(f"_reloop_feature_repo_{uuid.uuid4().hex[:8]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    objs = [v for v in vars(module).values() if isinstance(v, (Entity, DataSource, FeatureView, FeatureService))]
    # push sources reference their batch sources: apply batch sources too
    return objs


def apply_repo(cfg: FeastConfig, repo_path: str | None = None) -> None:
    """``feast apply`` in-process: register the declarations of ``<repo>/feature_repo.py``."""
    store = open_store(cfg, repo_path)
    store.apply(repo_objects(store.repo_path))


def offline_dir(store, view: str) -> str:
    """The directory of a view's offline Parquet files (its batch source path without ``/*.parquet``)."""
    fv = store.get_feature_view(view)
    path = fv.batch_source.path
    return posixpath.dirname(path) if path.endswith(".parquet") else path


def to_feast_frame(table: pa.Table):
    """Arrow snapshot (``event_timestamp`` in epoch ms) -> the pandas frame Feast writes."""
    ts = pc.cast(table["event_timestamp"], pa.timestamp("ms", tz="UTC"))
    return table.set_column(table.column_names.index("event_timestamp"), "event_timestamp", ts).to_pandas()


def write_snapshot(store, view: str, table: pa.Table, run_id: str) -> None:
    """Upsert a snapshot online and write it offline as ``part-<run_id>.parquet`` (idempotent)."""
    if table.num_rows == 0:
        return
    store.write_to_online_store(view, to_feast_frame(table))
    ts = pc.cast(table["event_timestamp"], pa.timestamp("ms", tz="UTC"))
    offline = table.set_column(table.column_names.index("event_timestamp"), "event_timestamp", ts)
    fs, root, _ = open_filesystem(offline_dir(store, view))
    write_parquet_atomic(fs, f"{root}/part-{run_id}.parquet", offline, durable=False)
