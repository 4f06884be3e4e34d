"""The reloop Feast repo as code: entities, push sources, feature views, feature services.

Declarations only, no I/O at import (``feast -c features apply`` imports this
module). The feature names are the columns that :mod:`pipelines.aggregates`
computes with its default :class:`~pipelines.aggregates.AggregateConfig`
(``tests/test_feast_repo.py`` keeps the two in step): impressions, positives and
smoothed CTR over 1 h, 1 day, 7 days and all time, seconds since the previous
interaction, and for users the last items seen (most recent first).

Where the data lives:

- online: ``feature_store.yaml`` (embedded: SQLite under ``data/``) or
  ``feature_store.redis.yaml`` (production: Redis);
Batch views (``user_profile``, ``item_catalog``): entity attributes from the
dataset's side tables (:mod:`reloop.side_tables`), one row per version of an
entity with the time it became valid (``event_timestamp``), written by reloop
as Parquet under ``data/offline/<view>/``, materialised online with Feast's
``materialize`` / ``materialize-incremental`` and joined point in time into
training examples (a version is seen by examples at or after its timestamp).
They never expire (TTL 0): a profile stays valid until its next version.
The ``ctr_<kind>_side_v<N>`` services add them to the streaming views.

- offline: one Parquet file per feature-job micro-batch under
  ``data/offline/<view>/`` next to this file (``RELOOP_FEAST_OFFLINE_ROOT``
  moves it, e.g. to an ``s3://`` prefix). The job writes these files itself,
  named by the Kafka offset range they cover, so a re-run after a crash
  overwrites instead of appending (Feast's own offline push rewrites the whole
  file on every call and is not idempotent).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float64, Int64, String
from feast.value_type import ValueType

from features.windows import feature_service_name, window_names  # noqa: E402  (after the feast imports)
from online_models.models import KINDS  # noqa: E402

WINDOWS = window_names()
#: online values older than this are treated as missing by Feast (an idle entity's window counts are stale)
FEATURE_TTL = timedelta(days=400)

_OFFLINE_ROOT = os.environ.get("RELOOP_FEAST_OFFLINE_ROOT") or str(Path(__file__).resolve().parent / "data" / "offline")


def _aggregate_fields(entity: str) -> list[Field]:
    fields: list[Field] = []
    for w in WINDOWS:
        fields += [
            Field(name=f"{entity}_imp_{w}", dtype=Int64, description=f"impressions in the last {w}"),
            Field(name=f"{entity}_pos_{w}", dtype=Int64, description=f"positives in the last {w}"),
            Field(name=f"{entity}_ctr_{w}", dtype=Float64, description=f"smoothed CTR over the last {w}"),
        ]
    fields.append(
        Field(
            name=f"{entity}_secs_since_last",
            dtype=Float64,
            description="seconds since the previous interaction (-1: none)",
        )
    )
    return fields


user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="an end user")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING, description="a recommendable item")

user_stats_batch_source = FileSource(
    name="user_stats_batch_source",
    path=f"{_OFFLINE_ROOT}/user_stats/*.parquet",
    timestamp_field="event_timestamp",
    description="per micro-batch snapshots of user aggregates written by pipelines.feature_job",
)
item_stats_batch_source = FileSource(
    name="item_stats_batch_source",
    path=f"{_OFFLINE_ROOT}/item_stats/*.parquet",
    timestamp_field="event_timestamp",
    description="per micro-batch snapshots of item aggregates written by pipelines.feature_job",
)
user_stats_push_source = PushSource(name="user_stats_push_source", batch_source=user_stats_batch_source)
item_stats_push_source = PushSource(name="item_stats_push_source", batch_source=item_stats_batch_source)

user_stats_fv = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=FEATURE_TTL,
    schema=[
        *_aggregate_fields("user"),
        Field(name="user_last_items", dtype=Array(String), description="last items seen, most recent first"),
    ],
    source=user_stats_push_source,
    online=True,
    tags={"owner": "pipelines.feature_job"},
)
item_stats_fv = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=FEATURE_TTL,
    schema=_aggregate_fields("item"),
    source=item_stats_push_source,
    online=True,
    tags={"owner": "pipelines.feature_job"},
)

# batch views: entity attributes from side tables (reloop.side_tables writes the Parquet files)
user_profile_source = FileSource(
    name="user_profile_source",
    path=f"{_OFFLINE_ROOT}/user_profile/*.parquet",
    timestamp_field="event_timestamp",
    description="versions of user profiles (valid from event_timestamp) written by reloop.side_tables",
)
item_catalog_source = FileSource(
    name="item_catalog_source",
    path=f"{_OFFLINE_ROOT}/item_catalog/*.parquet",
    timestamp_field="event_timestamp",
    description="versions of catalogue entries (valid from event_timestamp) written by reloop.side_tables",
)
user_profile_fv = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),  # 0 = never expires: a profile is valid until the user's next version
    schema=[
        Field(name="age_bucket", dtype=String, description="age group (<18, 18-24, ..., 56+)"),
        Field(name="gender", dtype=String, description="gender as given"),
        Field(name="occupation", dtype=String, description="occupation as given"),
        Field(name="zip_prefix", dtype=String, description="first 3 characters of the zip code"),
    ],
    source=user_profile_source,
    online=True,
    tags={"owner": "reloop.side_tables"},
)
item_catalog_fv = FeatureView(
    name="item_catalog",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="release_year", dtype=String, description="release year"),
        Field(name="genres", dtype=Array(String), description="genres (a bag, sorted)"),
    ],
    source=item_catalog_source,
    online=True,
    tags={"owner": "reloop.side_tables"},
)

# one feature service per model kind and feature-set version: models ask for a service by name
_DESCRIPTIONS = {
    "lr": "logistic regression CTR model",
    "deepfm": "DeepFM CTR model",
    "dcnv2": "DCNv2 CTR model",
    "din": "DIN (target attention over the last items) CTR model",
}
for _kind in KINDS:
    # Feast finds the services among this module's globals
    globals()[feature_service_name(_kind)] = FeatureService(
        name=feature_service_name(_kind),
        features=[user_stats_fv, item_stats_fv],
        description=_DESCRIPTIONS.get(_kind, f"{_kind} CTR model"),
    )
    # the same model kinds with the side attributes: streaming views + the batch views
    globals()[feature_service_name(_kind, side=True)] = FeatureService(
        name=feature_service_name(_kind, side=True),
        features=[user_stats_fv, item_stats_fv, user_profile_fv, item_catalog_fv],
        description=_DESCRIPTIONS.get(_kind, f"{_kind} CTR model") + " with user profile and item catalogue",
    )
