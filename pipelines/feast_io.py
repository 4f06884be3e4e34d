"""Open the Feast store of a profile, apply the repo, and write feature snapshots online and offline.

Online writes are upserts keyed by entity (SQLite ``INSERT OR REPLACE``, Redis
``HSET``), so writing the same snapshot twice is harmless. Offline rows go to
one Parquet file per run under the feature view's batch-source directory,
named by the run id, so a re-run overwrites the file instead of appending.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import FeastConfig
from pipelines.storage import open_filesystem, write_parquet_atomic

# Feast itself is imported in open_store and repo_objects, where a store is opened: importing it takes ~6 s
# here, and jobs.scoring (so the trainer actor and every retrain worker) imports this module for its names only

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
    raise FileNotFoundError(
        f"no Feast repo at {' or '.join(str(c) for c in tried)} (missing {missing}); "
        f"set feast.repo_path in the config or --feature_repo"
    )


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


# -- batch views: entity attributes from side tables (features/feature_repo.py: user_profile, item_catalog) --------

USER_PROFILE_VIEW = "user_profile"
ITEM_CATALOG_VIEW = "item_catalog"
#: the features of the batch views, and their value when an entity has none (missing: the encoder's bucket 0)
BATCH_FEATURES: dict[str, tuple[str, ...]] = {
    USER_PROFILE_VIEW: ("age_bucket", "gender", "occupation", "zip_prefix"),
    ITEM_CATALOG_VIEW: ("release_year", "genres"),
}
BAG_FEATURES = ("genres",)
_JOIN_KEYS = {USER_PROFILE_VIEW: "user_id", ITEM_CATALOG_VIEW: "item_id"}


def write_batch_source(store, view: str, table: pa.Table, run_id: str) -> str:
    """Write versions of entity attributes (``event_timestamp`` in epoch ms) as ``part-<run_id>.parquet`` of
    ``view``'s batch source; the same ``run_id`` overwrites (idempotent). Returns the file's path."""
    ts = pc.cast(table["event_timestamp"], pa.timestamp("ms", tz="UTC"))
    rows = table.set_column(table.column_names.index("event_timestamp"), "event_timestamp", ts)
    fs, root, _ = open_filesystem(offline_dir(store, view))
    path = f"{root}/part-{run_id}.parquet"
    write_parquet_atomic(fs, path, rows, durable=False)
    return path


def materialize_batch_views(
    store, end_ms: int | None = None, views: tuple[str, ...] = (USER_PROFILE_VIEW, ITEM_CATALOG_VIEW)
) -> None:
    """Copy the versions valid at ``end_ms`` (default now) online with Feast's own materialisation.

    A view never materialised gets ``materialize`` from the epoch (its TTL is 0, and ``materialize_incremental``
    would start one year back, missing older versions); later calls are ``materialize_incremental``.
    """

    end = datetime.now(UTC) if end_ms is None else datetime.fromtimestamp(end_ms / 1000, UTC)
    for view in views:
        if store.get_feature_view(view).most_recent_end_time is None:
            store.materialize(start_date=datetime(1970, 1, 1, tzinfo=UTC), end_date=end, feature_views=[view])
        else:
            store.materialize_incremental(end_date=end, feature_views=[view])


def _refs(views: tuple[str, ...]) -> list[str]:
    return [f"{v}:{f}" for v in views for f in BATCH_FEATURES[v]]


def batch_feature_refs(fields) -> list[str]:
    """Feature refs (``view:feature``) of the batch-view features named in ``fields``, in the views' order: what
    a model whose encoder reads those fields needs from ``user_profile`` / ``item_catalog``.

    >>> batch_feature_refs(["user_id", "genres", "age_bucket", "user_ctr_7d"])
    ['user_profile:age_bucket', 'item_catalog:genres']
    """
    wanted = set(fields)
    return [f"{v}:{f}" for v, names in BATCH_FEATURES.items() for f in names if f in wanted]


def _with_defaults(cols: dict[str, list]) -> dict[str, list]:
    # Feast returns None for an entity without a row; a bag's default is the empty bag
    return {f: ([v if v is not None else [] for v in vals] if f in BAG_FEATURES else vals) for f, vals in cols.items()}


def lookup_batch_features(
    store, user_ids: list[str], item_ids: list[str], views: tuple[str, ...] = (USER_PROFILE_VIEW, ITEM_CATALOG_VIEW)
) -> pa.Table:
    """The online batch features of (user, item) rows, for scoring: unknown entities get the defaults."""
    rows = [{"user_id": u, "item_id": i} for u, i in zip(user_ids, item_ids)]
    got = store.get_online_features(features=_refs(views), entity_rows=rows).to_dict()
    cols = _with_defaults({f: got[f] for v in views for f in BATCH_FEATURES[v]})
    return pa.table({"user_id": user_ids, "item_id": item_ids, **_arrow_cols(cols)})


def _arrow_cols(cols: dict[str, list]) -> dict[str, pa.Array]:
    return {f: pa.array(vals, pa.list_(pa.string()) if f in BAG_FEATURES else pa.string()) for f, vals in cols.items()}


def join_batch_features(
    store, examples: pa.Table, views: tuple[str, ...] = (USER_PROFILE_VIEW, ITEM_CATALOG_VIEW)
) -> pa.Table:
    """``examples`` (``user_id``, ``item_id``, ``ts`` epoch ms) plus the batch features valid at each row's time.

    Feast's point-in-time join (``get_historical_features``): each row gets the newest version with
    ``event_timestamp <= ts``, never a later one. Row order and the other columns are kept.
    """

    ent = pd.DataFrame(
        {
            "user_id": examples["user_id"].to_pylist(),
            "item_id": examples["item_id"].to_pylist(),
            "event_timestamp": pd.to_datetime(examples["ts"].to_numpy(), unit="ms", utc=True),
            "_row": range(examples.num_rows),
        }
    )
    df = store.get_historical_features(entity_df=ent, features=_refs(views)).to_df().sort_values("_row")
    cols = _with_defaults(
        {
            f: [None if _is_na(v) else (list(v) if f in BAG_FEATURES else v) for v in df[f]]
            for v_ in views
            for f in BATCH_FEATURES[v_]
        }
    )
    out = examples
    for f, arr in _arrow_cols(cols).items():
        out = out.drop_columns([f]) if f in out.column_names else out
        out = out.append_column(f, arr)
    return out


def _is_na(v) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN (pandas' missing float)
    except (TypeError, ValueError):  # arrays compare element-wise
        return False
