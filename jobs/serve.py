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
  -> ``{"request_id", "probability" (compensated), "base_probability", "model_version"}``
- ``/feedback``: ``{"request_id": str, "label": 0|1}`` or
  ``{"event": {"user_id", "item_id", "label", "context"?}}`` -> ``{"written": true, "model_version"}``

Errors: bad JSON 400, invalid fields 422 (the message names them), unknown
request id 404, body over the size limit 413, no model deployed 503. The
service binds 127.0.0.1 unless told otherwise, and swaps models when the
registry's current version changes (:meth:`Scorer.reload`), without dropping requests.

    python -m jobs.serve --registry .state/registry --feast-repo features --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.scoring import FeastLookup, Scorer, ScorerConfig, ScoringError

MAX_BODY_BYTES = 64 * 1024
Scalar = Union[str, int, float, bool]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ScoreRequest(_Strict):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    context: dict[str, Scalar] = Field(default_factory=dict, max_length=64)
    request_id: str | None = Field(default=None, min_length=1, max_length=128)


class FeedbackEvent(_Strict):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    label: Literal[0, 1]
    context: dict[str, Scalar] = Field(default_factory=dict, max_length=64)


class FeedbackRequest(_Strict):
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    label: Literal[0, 1] | None = None
    event: FeedbackEvent | None = None


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}")
    return "; ".join(parts)


def handle(scorer: Scorer, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """One request -> ``(HTTP status, JSON body)``; every host (uvicorn, Ray Serve) calls this."""
    if path == "/health" and method == "GET":
        return 200, scorer.health()
    if path not in ("/score", "/feedback"):
        return 404, {"error": f"no route {method} {path}; routes: POST /score, POST /feedback, GET /health"}
    if method != "POST":
        return 405, {"error": f"{path} takes POST"}
    if len(body) > MAX_BODY_BYTES:
        return 413, {"error": f"body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}"}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return 400, {"error": f"body is not valid JSON: {e}"}
    if not isinstance(data, dict):
        return 422, {"error": f"body must be a JSON object, got {type(data).__name__}"}
    try:
        if path == "/score":
            req = ScoreRequest.model_validate(data)
            return 200, scorer.score(req.user_id, req.item_id, req.context, req.request_id)
        fb = FeedbackRequest.model_validate(data)
        if fb.event is not None:
            if fb.request_id is not None or fb.label is not None:
                return 422, {"error": "give either request_id + label, or event (with its label), not both"}
            ev = fb.event
            return 200, scorer.feedback_event(ev.user_id, ev.item_id, ev.label, ev.context)
        if fb.request_id is None or fb.label is None:
            return 422, {"error": "feedback needs request_id and label (0 or 1), or an event with its label"}
        return 200, scorer.feedback(fb.request_id, fb.label)
    except ValidationError as e:
        return 422, {"error": _validation_message(e)}
    except ScoringError as e:
        return e.status, {"error": str(e)}


def build_scorer(registry_uri: str, feast_repo: str, feast_profile: str = "sqlite",
                 config: ScorerConfig = ScorerConfig(), redis: str | None = None) -> Scorer:
    """A started :class:`Scorer` reading features from the Feast repo ``feast_repo``."""
    import torch

    from jobs.registry import ModelRegistry
    from pipelines.feast_io import open_store
    from pipelines.config import FeastConfig

    # one request is a batch of one: intra-op threads only add hand-off cost (measured ~1.5x slower with 2)
    torch.set_num_threads(1)

    fc = FeastConfig(profile=feast_profile, repo_path=feast_repo,
                     **({"redis_connection_string": redis} if redis else {}))
    store = open_store(fc, feast_repo)
    scorer = Scorer(ModelRegistry(registry_uri), lambda fs: FeastLookup(store, fs), config)
    scorer.start()
    return scorer


def asgi_app(scorer: Scorer):
    """A Starlette app over :func:`handle`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> JSONResponse:
        status, out = handle(scorer, request.method, request.url.path, await request.body())
        return JSONResponse(out, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scorer.close()

    # one catch-all route: unknown paths and methods get the same JSON errors as everything else
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)], lifespan=lifespan)


def serve_http(scorer: Scorer, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(asgi_app(scorer), host=host, port=port, log_level="warning", access_log=False)


class ServeDeployment:
    """The same handlers as a Ray Serve deployment (``serve.deployment(ServeDeployment)``)."""

    def __init__(self, registry_uri: str, feast_repo: str, feast_profile: str = "sqlite",
                 scorer_config: dict | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.scorer = build_scorer(registry_uri, feast_repo, feast_profile, ScorerConfig(**(scorer_config or {})))

    def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update (``serve.run`` with a new ``user_config``): ``{"use_memory": bool}``
        switches the memory; any call also re-reads the registry's current version at once."""
        from dataclasses import replace

        if "use_memory" in user_config:
            self.scorer.config = replace(self.scorer.config, use_memory=bool(user_config["use_memory"]))
        self.scorer.reload()

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        status, out = handle(self.scorer, request.method, request.url.path, await request.body())
        return JSONResponse(out, status_code=status)


def serve_ray(registry_uri: str, feast_repo: str, feast_profile: str, scorer_config: dict, host: str, port: int,
              address: str | None = None, blocking: bool = True):
    """Run the deployment on Ray Serve (local ``ray.init`` unless ``address``)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address) if address else ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    app = serve.deployment(ServeDeployment, name="reloop-scorer", ray_actor_options={"num_cpus": 1}).bind(
        registry_uri, feast_repo, feast_profile, scorer_config)
    return serve.run(app, name="reloop", route_prefix="/", blocking=blocking)


def prepare_feature_store(dest: str, events, feast_profile: str = "sqlite") -> Any:
    """Copy the Feast repo of ``features/`` to ``dest``, apply it, and write the online features of ``events``.

    For demos, tests and benchmarks: a private store (its own SQLite file and offline dir) holding the
    features every user and item of ``events`` has after the last event (what the feature job would
    have written). Returns the open ``FeatureStore``.
    """
    import os
    import shutil
    from pathlib import Path

    from pipelines.aggregates import FeatureState, compute_features, snapshot
    from pipelines.feast_io import ITEM_VIEW, USER_VIEW, apply_repo, open_store, write_snapshot
    from pipelines.config import FeastConfig

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
        users, items = snapshot(state, int(events["ts"].to_numpy().max()) + 1)
        write_snapshot(store, USER_VIEW, users, "demo")
        write_snapshot(store, ITEM_VIEW, items, "demo")
    finally:
        if old is None:
            os.environ.pop("RELOOP_FEAST_OFFLINE_ROOT", None)
        else:
            os.environ["RELOOP_FEAST_OFFLINE_ROOT"] = old
    return store


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
    a = p.parse_args(argv)
    from jobs.config import load_jobs_config as load_config

    cfg = load_config(a.config)
    registry = a.registry or cfg.storage.registry_uri
    repo = a.feast_repo or cfg.feast.repo_path
    sc = {"use_memory": not a.no_memory, "poll_seconds": a.poll}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.backend == "ray":
        serve_ray(registry, repo, cfg.feast.profile, sc, a.host, a.port, address=cfg.ray.address)
        return 0
    scorer = build_scorer(registry, repo, cfg.feast.profile, ScorerConfig(**sc), cfg.feast.redis_connection_string)
    print(f"scoring service on http://{a.host}:{a.port} (model {scorer.health()['model_version']})", flush=True)
    serve_http(scorer, a.host, a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
