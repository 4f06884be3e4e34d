"""The scoring service: ``POST /score``, ``POST /feedback``, ``GET /health`` over :class:`jobs.scoring.Scorer`.

Two hosts for the same handlers:

- ``--backend http`` (default): a Starlette app on uvicorn, one process, scoring
  on the event loop (the work is ~1 ms of CPU; a thread hop would cost more);
- ``--backend ray``: a Ray Serve deployment (HTTP proxy + replica) calling the
  same handlers. ``benchmarks/bench_serve.py`` measures both; on this 2-core
  machine Serve's proxy hop costs more than the whole scoring path, so the
  plain server is the default (see the benchmark JSON for the numbers).

Requests (JSON, unknown fields rejected):

- ``/score``: ``{"user_id": str, "item_id": str, "context": {str: str|number|bool}?, "request_id": str?}``
  -> ``{"request_id", "impression_id", "probability" (compensated), "base_probability", "model_version"}``;
  or a **slate**: ``{"user_id", "candidates": [distinct item ids, at most 1,000], "context"?, "request_id"?}`` ->
  ``{"request_id", "model_version", "ranking": [{"item_id", "impression_id", "probability",
  "base_probability"}, ...]}`` ranked by compensated probability: one Feast lookup, one batched forward
  pass and one memory read for the whole slate;
- ``/feedback``: ``{"impression_id": str, "label": 0|1}`` (or ``{"request_id", "label"}`` for a
  one-item request). The impression must have been issued here; the outcome passes the feedback guard
  (:mod:`jobs.feedback`: once per impression, per-pair/user/item caps, lockstep alerts) before it
  reaches the memory or its rebuild buffer. Outcomes of events not scored here are refused.

Errors: bad JSON (or nested deeper than the event contract allows) 400, invalid fields 422 (the message
names them: also integers outside int64, non-finite numbers, context keys named like a feature or a
core column, values the model's encoder cannot take, an empty slate, more than 1,000 candidates, the same
item twice in a slate, lone surrogates in a string), missing or wrong bearer token 401, unknown
impression 404, a second outcome with another label 409, over a feedback cap 429, body over the size
limit 413 (checked while reading: a huge body is never held in memory; a slate of 10,001 ids is one), no
model deployed 503.

**Impression log** (``--impressions-topic`` / ``--feedback-topic``, :mod:`jobs.impression_log`): every
scored candidate is published as a contract-v2 ``impression`` (its ``position`` is its rank in the
answer) and every accepted click as a v2 ``feedback``, checked with the feature job's own parsers, so the
attribution join (:mod:`pipelines.join`) labels served traffic. Publishing never blocks or fails a
request: a broker outage shows as dropped/failed counts under ``impression_log`` in ``GET /health``.

At serving, request context never overrides an online feature: the lookup's values win, and a context
key named like a pipeline column is refused. Authentication: with ``RELOOP_SERVE_TOKEN`` (or
``--token-env NAME``) set, every route but ``GET /health`` needs ``Authorization: Bearer <token>``; a
non-loopback ``--host`` refuses to start without one. The service binds 127.0.0.1 unless told
otherwise, and swaps models when the registry's current version changes (:meth:`Scorer.reload`),
without dropping requests.

    python -m jobs.serve --registry .state/registry --feast-repo features --port 8000 \
        --impressions-topic --feedback-topic        # log to kafka.impressions_topic / kafka.feedback_topic
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hmac
import ipaddress
import logging
import math
import os
import shutil
import sys
import time
import uuid
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jobs.alerts import dispatcher_from_config
from jobs.config import load_jobs_config as load_config
from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.impression_log import ImpressionLog, ImpressionLogConfig
from jobs.ray_local import init_local
from jobs.registry import ModelRegistry
from jobs.scoring import FeastLookup, ScoredSlate, Scorer, ScorerConfig, ScoringError, SlateCandidate
from pipelines.aggregates import FeatureState, compute_features, snapshot
from pipelines.config import FeastConfig, KafkaConfig
from pipelines.events import INT64_MAX, INT64_MIN, decode_json, reserved_name
from pipelines.feast_io import (
    ITEM_CATALOG_VIEW,
    ITEM_VIEW,
    USER_PROFILE_VIEW,
    USER_VIEW,
    apply_repo,
    materialize_batch_views,
    open_store,
    write_batch_source,
    write_snapshot,
)

log = logging.getLogger("reloop.serve")

MAX_BODY_BYTES = 64 * 1024
MAX_CANDIDATES = 1_000
TOKEN_ENV = "RELOOP_SERVE_TOKEN"
Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _unicode_ok(s: str) -> bool:
    """JSON may escape lone surrogates (``"\\ud800"``): no Arrow string, Kafka key or v2 record can hold one
    (pydantic refuses them in plain ``str`` fields itself; candidates and context are checked here)."""
    try:
        s.encode()
        return True
    except UnicodeEncodeError:
        return False


def _check_context(v: dict[str, Any]) -> dict[str, Any]:
    for k, x in v.items():
        if reserved_name(k):
            raise ValueError(f"context key {k!r} is named like a pipeline column (feature, id or Kafka); rename it")
        if len(k) > 128:
            raise ValueError("context keys are at most 128 characters")
        if isinstance(x, int) and not isinstance(x, bool) and not INT64_MIN <= x <= INT64_MAX:
            raise ValueError(f"context.{k}: integer outside the int64 range")
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"context.{k}: must be finite")
        if isinstance(x, str) and len(x) > 1024:
            raise ValueError(f"context.{k}: string longer than 1024")
        if not _unicode_ok(k) or (isinstance(x, str) and not _unicode_ok(x)):
            raise ValueError(f"context.{k!r}: a lone surrogate escape is not text")
    return v


class ScoreRequest(_Strict):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str | None = Field(default=None, min_length=1, max_length=256)
    candidates: list[str] | None = Field(default=None, min_length=1, max_length=MAX_CANDIDATES)
    context: dict[str, Scalar] = Field(default_factory=dict, max_length=64)
    request_id: str | None = Field(default=None, min_length=1, max_length=128)

    _context = field_validator("context")(_check_context)

    @field_validator("candidates")
    @classmethod
    def _items(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if any(not 0 < len(i) <= 256 for i in v):
            raise ValueError("every candidate is an item id of 1 to 256 characters")
        if len(set(v)) < len(v):
            seen: set[str] = set()
            dup = next(i for i in v if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise ValueError(f"candidates must be distinct: item {dup[:64]!r} appears {v.count(dup)} times")
        if not all(map(_unicode_ok, v)):
            raise ValueError("a candidate holds a lone surrogate escape, which is not text")
        return v


class FeedbackRequest(_Strict):
    impression_id: str | None = Field(default=None, min_length=1, max_length=128)
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    label: Literal[0, 1] | None = None
    event: dict[str, Any] | None = None


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}")
    return "; ".join(parts)


_GUARDS: weakref.WeakKeyDictionary[Scorer, FeedbackGuard] = weakref.WeakKeyDictionary()


def guard_for(scorer: Scorer, config: GuardConfig | None = None, alert=None) -> FeedbackGuard:
    """The feedback guard of ``scorer`` (one per scorer: impressions are issued and answered on it)."""
    g = _GUARDS.get(scorer)
    if g is None or config is not None:
        g = FeedbackGuard(config or GuardConfig(), alert)
        _GUARDS[scorer] = g
    return g


def score_slate(
    scorer: Scorer, guard: FeedbackGuard, user_id: str, items: list[str], context: dict[str, Any], ts_ms: int = 0
) -> tuple[Any, list[dict[str, Any]]]:
    """One user, many candidates: one lookup, one forward pass, one memory read; ``(bundle, rows)`` in
    candidate order, each with its impression id (issued on ``guard``, served at event time ``ts_ms``)."""
    bundle = scorer.bundle
    if bundle is None:
        raise ScoringError(f"no model is deployed yet (registry {scorer.registry.uri} has no current version)", 503)
    n = len(items)
    row: dict[str, list] = {"user_id": [user_id] * n, "item_id": list(items)}
    for k, v in context.items():
        row[k] = [v] * n
    for k, v in bundle.lookup.lookup_dict(row["user_id"], row["item_id"]).items():
        row[k] = v  # online features win over any same-named request context
    try:
        table = scorer._table(row)
        base, key = scorer._forward(bundle, table)
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, RuntimeError) as e:
        # pyarrow's ArrowInvalid/ArrowTypeError are ValueError/TypeError subclasses
        raise ScoringError(f"the request cannot be encoded for model {bundle.version}: {e}", 422) from e
    comp = base
    if scorer.config.use_memory:
        with scorer._lock:
            comp = bundle.memory.estimate(key, base)
    base_l, comp_l = base.tolist(), comp.tolist()
    slate = ScoredSlate(bundle.version, table, key, base_l)
    payloads = [slate.candidate(i) for i in range(n)]
    ids = guard.impressions.issue_many(user_id, list(items), payloads, ts_ms)
    scorer.stats["scored"] += n
    return bundle, [
        {"item_id": it, "impression_id": iid, "probability": float(c), "base_probability": float(b)}
        for it, iid, c, b in zip(items, ids, comp_l, base_l)
    ]


def handle(
    scorer: Scorer,
    method: str,
    path: str,
    body: bytes,
    guard: FeedbackGuard | None = None,
    client: str = "",
    impressions: ImpressionLog | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request -> ``(HTTP status, JSON body)``; every host (uvicorn, Ray Serve) calls this.

    Input errors are 4xx, never 500: a 500 means a bug here, and is logged with its traceback. With
    ``impressions``, served candidates and accepted clicks are queued for Kafka (never blocking).
    """
    if path == "/health" and method == "GET":
        out = scorer.health()
        if impressions is not None:
            out["impression_log"] = impressions.health()
        return 200, out
    if path not in ("/score", "/feedback"):
        return 404, {"error": f"no route {method} {path}; routes: POST /score, POST /feedback, GET /health"}
    if method != "POST":
        return 405, {"error": f"{path} takes POST"}
    if len(body) > MAX_BODY_BYTES:
        return 413, {"error": f"body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}"}
    data, why = decode_json(bytes(body))
    if why:
        return 400, {"error": f"body is not valid JSON: {why}"}
    if not isinstance(data, dict):
        return 422, {"error": f"body must be a JSON object, got {type(data).__name__}"}
    guard = guard or guard_for(scorer)
    try:
        if path == "/score":
            return 200, _score(scorer, guard, ScoreRequest.model_validate(data), impressions)
        return _feedback(scorer, guard, FeedbackRequest.model_validate(data), client, impressions)
    except ValidationError as e:
        return 422, {"error": _validation_message(e)}
    except ScoringError as e:
        return e.status, {"error": str(e)}
    except RecursionError as e:  # defence in depth: never a 500 for a request's shape
        return 400, {"error": f"request too deeply nested: {e}"}


def _score(
    scorer: Scorer, guard: FeedbackGuard, req: ScoreRequest, impressions: ImpressionLog | None = None
) -> dict[str, Any]:

    if (req.item_id is None) == (req.candidates is None):
        raise ScoringError("give either item_id (one pair) or candidates (a slate), not both", 422)
    rid = req.request_id or uuid.uuid4().hex
    ts = int(time.time() * 1000)
    if req.item_id is not None:
        bundle, (one,) = score_slate(scorer, guard, req.user_id, [req.item_id], req.context, ts)
        _alias(guard, rid, one["impression_id"])
        if impressions is not None:
            impressions.impressions(ts, req.user_id, rid, [(one["impression_id"], req.item_id, 0)], req.context)
        return {
            "request_id": rid,
            "impression_id": one["impression_id"],
            "probability": one["probability"],
            "base_probability": one["base_probability"],
            "model_version": bundle.version,
        }
    bundle, rows = score_slate(scorer, guard, req.user_id, req.candidates, req.context, ts)
    rows.sort(key=lambda r: -r["probability"])
    if impressions is not None:  # position = the rank served (0 = top)
        impressions.impressions(
            ts, req.user_id, rid, [(r["impression_id"], r["item_id"], pos) for pos, r in enumerate(rows)], req.context
        )
    return {"request_id": rid, "model_version": bundle.version, "ranking": rows}


def _alias(guard: FeedbackGuard, request_id: str, impression_id: str) -> None:
    """request id -> impression id of a one-item request (the older feedback form), bounded like impressions."""

    aliases = getattr(guard, "_aliases", None)
    if aliases is None:
        aliases = guard._aliases = collections.OrderedDict()
    aliases[request_id] = impression_id
    while len(aliases) > guard.config.max_impressions:
        aliases.popitem(last=False)


def _feedback(
    scorer: Scorer, guard: FeedbackGuard, fb: FeedbackRequest, client: str, impressions: ImpressionLog | None = None
) -> tuple[int, dict[str, Any]]:
    if fb.event is not None:
        raise ScoringError(
            "feedback must name an impression issued by /score (impression_id); outcomes of "
            "events not scored here are not accepted",
            422,
        )
    if fb.label is None or (fb.impression_id is None) == (fb.request_id is None):
        raise ScoringError("feedback needs label (0 or 1) and one of impression_id or request_id", 422)
    iid = fb.impression_id
    if iid is None:
        iid = getattr(guard, "_aliases", {}).get(fb.request_id)
        if iid is None:
            raise ScoringError(f"unknown request_id {fb.request_id!r} (never scored here as one item, or expired)", 404)
    verdict = guard.admit(iid, fb.label, client)
    if not verdict.accepted:
        if verdict.reason == "duplicate":
            return 200, {"written": False, "duplicate": True}
        what = "impression_id" if fb.impression_id else "request_id"
        return verdict.status, {"error": f"{what} {fb.impression_id or fb.request_id!r}: {verdict.reason}"}
    rec: SlateCandidate = verdict.impression.payload
    out = scorer._write(rec.row, fb.label, rec)
    if impressions is not None:
        if fb.label == 1:  # never stamped before its impression, whatever the wall clock did meanwhile
            impressions.feedback(iid, max(int(time.time() * 1000), verdict.impression.ts_ms), "click")
        else:  # v2 has no negative record: the join emits the negative when the window closes
            impressions.negative()
    return 200, out


def build_scorer(
    registry_uri: str,
    feast_repo: str,
    feast_profile: str = "sqlite",
    config: ScorerConfig = ScorerConfig(),
    redis: str | None = None,
) -> Scorer:
    """A started :class:`Scorer` reading features from the Feast repo ``feast_repo``."""

    # one request is a batch of one: intra-op threads only add hand-off cost (measured ~1.5x slower with 2)
    torch.set_num_threads(1)

    fc = FeastConfig(
        profile=feast_profile, repo_path=feast_repo, **({"redis_connection_string": redis} if redis else {})
    )
    store = open_store(fc, feast_repo)
    scorer = Scorer(ModelRegistry(registry_uri), lambda fs: FeastLookup(store, fs), config)
    scorer.start()
    return scorer


class BodyTooLarge(Exception):
    pass


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (:class:`BodyTooLarge`) as soon as it passes ``limit`` bytes: by its
    Content-Length before reading, or while streaming it in (chunked or lying clients)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


def authorized(header: str | None, token: str | None) -> bool:
    """``Authorization: Bearer <token>`` in constant time; everything is allowed without a token."""
    if not token:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


def asgi_app(
    scorer: Scorer,
    token: str | None = None,
    guard: FeedbackGuard | None = None,
    impressions: ImpressionLog | None = None,
):
    """A Starlette app over :func:`handle`, with the streaming body limit and optional bearer auth (and the
    impression log, closed with the app)."""

    guard = guard or guard_for(scorer)

    async def endpoint(request: Request) -> JSONResponse:
        path, method = request.url.path, request.method
        if not (path == "/health" and method == "GET") and not authorized(request.headers.get("authorization"), token):
            return JSONResponse(
                {"error": "missing or wrong bearer token (Authorization: Bearer ...)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            body = await read_body(request)
        except BodyTooLarge as e:
            return JSONResponse(
                {"error": f"body of {e.args[0]}+ bytes is over the limit of {MAX_BODY_BYTES}"},
                status_code=413,
                headers={"Connection": "close"},
            )
        client = request.client.host if request.client else ""
        try:
            status, out = handle(scorer, method, path, body, guard, client, impressions)
        except Exception:  # noqa: BLE001  (a bug: logged with its traceback, answered as 500, still serving)
            log.exception("internal error on %s %s", method, path)
            status, out = 500, {"error": "internal error (logged)"}
        return JSONResponse(out, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scorer.close()
        if impressions is not None:
            impressions.close()

    # one catch-all route: unknown paths and methods get the same JSON errors as everything else
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)], lifespan=lifespan)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_token(host: str, token_env: str = TOKEN_ENV) -> str | None:
    """The bearer token from the environment; required off loopback (``ScoringError``), warned about on it."""
    token = os.environ.get(token_env) or None
    if token is None and not is_loopback(host):
        raise ScoringError(
            f"--host {host} is not loopback: set a bearer token in ${token_env} "
            f"(clients send Authorization: Bearer <token>)",
            2,
        )
    if token is None:
        log.warning("scoring service without authentication (set $%s to require a bearer token)", token_env)
    return token


def serve_http(
    scorer: Scorer,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    guard: FeedbackGuard | None = None,
    impressions: ImpressionLog | None = None,
) -> None:

    uvicorn.run(
        asgi_app(scorer, token, guard, impressions), host=host, port=port, log_level="warning", access_log=False
    )


def impression_log(
    kafka: Any, impressions_topic: str | None, feedback_topic: str | None, **config: Any
) -> ImpressionLog | None:
    """The service's impression log (a started :class:`ImpressionLog`), or None when neither topic is set.

    ``kafka`` is a :class:`pipelines.config.KafkaConfig` (bootstrap and security settings); an empty topic
    name means the config's ``impressions_topic`` / ``feedback_topic``.
    """
    if impressions_topic is None and feedback_topic is None:
        return None
    cfg = ImpressionLogConfig(
        impressions_topic=(impressions_topic or kafka.impressions_topic) if impressions_topic is not None else None,
        feedback_topic=(feedback_topic or kafka.feedback_topic) if feedback_topic is not None else None,
        **config,
    )
    return ImpressionLog(kafka, cfg)


class ServeDeployment:
    """The same handlers as a Ray Serve deployment (``serve.deployment(ServeDeployment)``)."""

    def __init__(
        self,
        registry_uri: str,
        feast_repo: str,
        feast_profile: str = "sqlite",
        scorer_config: dict | None = None,
        impression_topics: dict | None = None,
        kafka: dict | None = None,
    ) -> None:

        logging.basicConfig(level=logging.INFO)
        self.scorer = build_scorer(registry_uri, feast_repo, feast_profile, ScorerConfig(**(scorer_config or {})))
        topics = impression_topics or {}
        self.impressions = impression_log(
            KafkaConfig(**(kafka or {})), topics.get("impressions"), topics.get("feedback")
        )

    def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update (``serve.run`` with a new ``user_config``): ``{"use_memory": bool}``
        switches the memory; any call also re-reads the registry's current version at once."""

        if "use_memory" in user_config:
            self.scorer.config = replace(self.scorer.config, use_memory=bool(user_config["use_memory"]))
        self.scorer.reload()

    async def __call__(self, request):

        if not authorized(request.headers.get("authorization"), os.environ.get(TOKEN_ENV) or None) and not (
            request.url.path == "/health" and request.method == "GET"
        ):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        try:
            body = await read_body(request)
        except BodyTooLarge as e:
            return JSONResponse(
                {"error": f"body of {e.args[0]}+ bytes is over the limit of {MAX_BODY_BYTES}"}, status_code=413
            )
        status, out = handle(
            self.scorer,
            request.method,
            request.url.path,
            body,
            None,
            request.client.host if request.client else "",
            self.impressions,
        )
        return JSONResponse(out, status_code=status)


def serve_ray(
    registry_uri: str,
    feast_repo: str,
    feast_profile: str,
    scorer_config: dict,
    host: str,
    port: int,
    address: str | None = None,
    blocking: bool = True,
    impression_topics: dict | None = None,
    kafka: dict | None = None,
):
    """Run the deployment on Ray Serve (local ``ray.init`` unless ``address``)."""
    # Ray at call time: it reads its auth mode and token when its core library loads, which a cluster
    # profile sets after this module is imported (see jobs.ray_local)
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address) if address else init_local(num_cpus=2)
    serve.start(http_options={"host": host, "port": port})
    # under `python -m jobs.serve` this module is __main__, which Ray would pickle by value with all its
    # globals (the feedback guards' WeakKeyDictionary cannot be pickled): the importable module goes by name
    from jobs.serve import ServeDeployment as deployment_cls  # noqa: PLW0406  (this module, by its import name)

    app = serve.deployment(deployment_cls, name="reloop-scorer", ray_actor_options={"num_cpus": 1}).bind(
        registry_uri, feast_repo, feast_profile, scorer_config, impression_topics, kafka
    )
    return serve.run(app, name="reloop", route_prefix="/", blocking=blocking)


def prepare_feature_store(dest: str, events, feast_profile: str = "sqlite", users=None, items=None) -> Any:
    """Copy the Feast repo of ``features/`` to ``dest``, apply it, and write the online features of ``events``.

    For demos, tests and benchmarks: a private store (its own SQLite file and offline dir) holding the
    features every user and item of ``events`` has after the last event (what the feature job would
    have written). ``users`` / ``items``: side tables (:mod:`reloop.side_tables` columns, ``valid_from`` in
    epoch ms) written as the batch sources of ``user_profile`` / ``item_catalog`` and materialised online
    with Feast's own ``materialize``, as ``reloop`` publishes them. Returns the open ``FeatureStore``.
    """

    src = Path(__file__).resolve().parent.parent / "features"
    dest_p = Path(dest)
    dest_p.mkdir(parents=True, exist_ok=True)
    for name in ("feature_repo.py", "feature_store.yaml", "feature_store.redis.yaml"):
        if (src / name).exists():
            shutil.copy(src / name, dest_p / name)
    old = os.environ.get("RELOOP_FEAST_OFFLINE_ROOT")
    os.environ["RELOOP_FEAST_OFFLINE_ROOT"] = str(dest_p / "data" / "offline")
    try:
        fc = FeastConfig(profile=feast_profile, repo_path=str(dest_p))
        apply_repo(fc, str(dest_p))
        store = open_store(fc, str(dest_p))
        _, state, _ = compute_features(events, FeatureState.empty())
        user_rows, item_rows = snapshot(state, int(events["ts"].to_numpy().max()) + 1)
        write_snapshot(store, USER_VIEW, user_rows, "demo")
        write_snapshot(store, ITEM_VIEW, item_rows, "demo")
        side = {v: t for v, t in ((USER_PROFILE_VIEW, users), (ITEM_CATALOG_VIEW, items)) if t is not None}
        for view, table in side.items():
            names = ["event_timestamp" if c == "valid_from" else c for c in table.column_names]
            write_batch_source(store, view, table.rename_columns(names), "demo")
        if side:
            materialize_batch_views(store, views=tuple(side))
    finally:
        if old is None:
            os.environ.pop("RELOOP_FEAST_OFFLINE_ROOT", None)
        else:
            os.environ["RELOOP_FEAST_OFFLINE_ROOT"] = old
    return store


def _alert_sink(cfg):
    """Lockstep alerts go through the configured hooks (webhooks, Kafka, Python), in the background."""
    try:
        dispatcher = dispatcher_from_config(cfg)
    except Exception as e:  # noqa: BLE001  (no hooks configured or unusable: log the alerts instead)
        log.warning("feedback alerts go to the log only: %s", e)
        return lambda alert: log.warning("ALERT %s", alert.get("message"))
    return lambda alert: dispatcher.deliver(alert)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="reloop YAML config (registry URI and Feast profile defaults)")
    p.add_argument("--registry", help="registry URI (default: storage.registry_uri)")
    p.add_argument("--feast-repo", help="Feast repo path (default: feast.repo_path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["http", "ray"], default="http")
    p.add_argument("--no-memory", action="store_true", help="serve base predictions only")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between registry checks")
    p.add_argument("--token-env", default=TOKEN_ENV, help=f"env var holding the bearer token (default {TOKEN_ENV})")
    p.add_argument(
        "--impressions-topic",
        nargs="?",
        const="",
        default=None,
        metavar="TOPIC",
        help="publish every scored candidate as a v2 impression (bare flag: kafka.impressions_topic)",
    )
    p.add_argument(
        "--feedback-topic",
        nargs="?",
        const="",
        default=None,
        metavar="TOPIC",
        help="publish every accepted click as v2 feedback (bare flag: kafka.feedback_topic)",
    )
    a = p.parse_args(argv)

    cfg = load_config(a.config)  # a bad config fails first, alone
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = serve_token(a.host, a.token_env)
    except ScoringError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    registry = a.registry or cfg.storage.registry_uri
    repo = a.feast_repo or cfg.feast.repo_path
    sc = {"use_memory": not a.no_memory, "poll_seconds": a.poll, "memory": cfg.memory.settings()}
    if a.backend == "ray":
        serve_ray(
            registry,
            repo,
            cfg.feast.profile,
            sc,
            a.host,
            a.port,
            address=cfg.ray.address,
            impression_topics={"impressions": a.impressions_topic, "feedback": a.feedback_topic},
            kafka=cfg.kafka.model_dump(),
        )
        return 0
    scorer = build_scorer(registry, repo, cfg.feast.profile, ScorerConfig(**sc), cfg.feast.redis_connection_string)
    print(f"scoring service on http://{a.host}:{a.port} (model {scorer.health()['model_version']})", flush=True)
    guard = guard_for(scorer, GuardConfig(), alert=_alert_sink(cfg))
    impressions = impression_log(cfg.kafka, a.impressions_topic, a.feedback_topic)
    if impressions is not None:
        print(
            f"impression log: {impressions.config.impressions_topic} / {impressions.config.feedback_topic} "
            f"on {cfg.kafka.bootstrap_servers}",
            flush=True,
        )
    serve_http(scorer, a.host, a.port, token, guard, impressions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
