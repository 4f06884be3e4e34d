"""Slate scoring: ``POST /score`` latency at 1, 100 and 1,000 candidates, in process and over HTTP, against
the same candidates scored as single-pair requests in the same run.

One set-up (:func:`benchmarks.common.serve_world`): a SQLite Feast store with the online features after the
first MovieLens-100K events, the user profiles and item catalogue materialised beside them, and a DCNv2
trained on those events. Every request includes its Feast online lookup (one ``get_online_features`` call
for the whole slate), the encoding, one batched forward pass and the memory's read (filled with 1,000 real
outcomes first), and the issue of one impression id per candidate.

Candidates are distinct films drawn from the whole catalogue (some without streaming features yet, as in
production), for a user drawn from the events.

- ``in-process``: :func:`jobs.serve.handle` (the request path without HTTP: JSON, validation, scoring);
- ``http``: the uvicorn service (``python -m jobs.serve``, its own process) over one keep-alive
  ``http.client`` connection;
- ``http, impression log`` (``--kafka``): a second such service publishing every candidate as a v2
  impression (and clicks as feedback) to the local broker; requests alternate between the two servers;
- ``in-process, side``: the same DCNv2 architecture reading the side attributes too (seeded weights:
  latency does not depend on them), so the batch views are looked up in the same Feast call (issue 17).

Reference (same run, requests alternated with the slates so a load change hits both): the slate's N
candidates as N single-pair requests, one after the other. ``speedup`` = reference p50 / slate p50;
``cand/s`` = candidates per second of one client at the p50. ``feast`` is the lookup of N rows alone.

    python benchmarks/bench_slate.py [--events 20000] [--reps 400,60,30] [--kafka]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataclasses import replace

import requests
import torch

from benchmarks.common import ServerProc, fill, pct, report, serve_world, services_up  # noqa: E402
from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.registry import ModelRegistry
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import handle
from online_models.encoding import EncoderConfig
from online_models.models import ModelConfig, build_model
from reloop.side_tables import ITEM_ATTRIBUTES, ITEM_BAGS, USER_ATTRIBUTES, load_side_tables

SIZES = (1, 100, 1000)


def side_registry(root: Path, reg):
    """A second registry: the trained model's architecture over the side attributes as well (seeded weights)."""

    entry = reg.entry(reg.current())
    enc = EncoderConfig.from_dict(entry.extra["encoder"])
    mc = ModelConfig.from_dict(entry.model_config)
    cat = tuple(enc.categorical_fields) + USER_ATTRIBUTES + ITEM_ATTRIBUTES

    enc = replace(enc, categorical_fields=cat, bag_fields=ITEM_BAGS)
    mc = replace(mc, num_categorical=len(cat), num_bags=len(ITEM_BAGS), categorical_fields=cat)
    torch.manual_seed(0)
    side = ModelRegistry(str(root / "reg-side"))
    side.publish(
        build_model(mc).state_dict(),
        model_config=mc.to_dict(),
        feature_service=entry.feature_service,
        extra={"encoder": enc.to_dict()},
        training_range=entry.training_range,
        promote=True,
    )
    return side


def scorer_for(store, reg, pairs, labels):

    sc = Scorer(reg, lambda fs: FeastLookup(store, fs), ScorerConfig())
    sc.reload()
    for (u, i), y in zip(pairs[:1000], labels[:1000]):  # the memory holds real outcomes
        sc.feedback(sc.score(u, i)["request_id"], y)
    return sc, FeedbackGuard(GuardConfig())


def requests_for(n: int, reps: int, users: list[str], items: list[str], seed: int) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(seed)
    return [
        (users[int(rng.integers(len(users)))], [items[k] for k in rng.choice(len(items), n, replace=False)])
        for _ in range(reps)
    ]


def slate_body(user: str, cands: list[str]) -> bytes:
    return json.dumps({"user_id": user, "candidates": cands}).encode()


def pair_body(user: str, item: str) -> bytes:
    return json.dumps({"user_id": user, "item_id": item}).encode()


def bench_in_process(sc, guard, reqs) -> dict:

    slate, ref, feast = [], [], []
    lookup = sc.bundle.lookup
    for user, cands in reqs:
        body = slate_body(user, cands)
        t0 = time.perf_counter()
        status, _ = handle(sc, "POST", "/score", body, guard)
        slate.append(time.perf_counter() - t0)
        assert status == 200, status
        bodies = [pair_body(user, c) for c in cands]
        t0 = time.perf_counter()
        for b in bodies:
            status, _ = handle(sc, "POST", "/score", b, guard)
        ref.append(time.perf_counter() - t0)
        assert status == 200, status
        t0 = time.perf_counter()
        lookup.lookup_dict([user] * len(cands), cands)
        feast.append(time.perf_counter() - t0)
    return {"slate": slate, "ref": ref, "feast": feast}


def bench_http(ports: dict[str, int], reqs) -> dict[str, dict]:
    """The same slates (then their single pairs) on each server in turn, request by request, so a load change
    on the shared machine hits every server alike; one keep-alive connection per server."""
    conns = {k: http.client.HTTPConnection("127.0.0.1", port, timeout=120) for k, port in ports.items()}
    headers = {"content-type": "application/json"}

    def post(conn, body: bytes) -> None:
        conn.request("POST", "/score", body=body, headers=headers)
        r = conn.getresponse()
        r.read()  # the whole answer: a 1,000-candidate ranking is ~150 KB of JSON
        assert r.status == 200, r.status

    lat = {k: {"slate": [], "ref": []} for k in ports}
    for user, cands in reqs:
        body, bodies = slate_body(user, cands), [pair_body(user, c) for c in cands]
        for k, conn in conns.items():
            t0 = time.perf_counter()
            post(conn, body)
            lat[k]["slate"].append(time.perf_counter() - t0)
        for k, conn in conns.items():
            t0 = time.perf_counter()
            for b in bodies:
                post(conn, b)
            lat[k]["ref"].append(time.perf_counter() - t0)
    for conn in conns.values():
        conn.close()
    return lat


def row(path: str, n: int, lat: dict) -> dict:
    s, r = pct(lat["slate"]), pct(lat["ref"])
    out = {
        "path": path,
        "candidates": n,
        "requests": s["n"],
        "slate_p50_ms": s["p50_ms"],
        "slate_p99_ms": s["p99_ms"],
        "slate_cand_per_s": n / (s["p50_ms"] / 1e3),
        "ref_p50_ms": r["p50_ms"],
        "ref_p99_ms": r["p99_ms"],
        "ref_cand_per_s": n / (r["p50_ms"] / 1e3),
        "speedup_p50": r["p50_ms"] / s["p50_ms"],
    }
    if "feast" in lat:
        out["feast_p50_ms"] = pct(lat["feast"])["p50_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--reps", default="400,60,30", help="slates per size (1, 100, 1,000 candidates)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--no-side", action="store_true", help="skip the side-feature model")
    ap.add_argument(
        "--kafka",
        action="store_true",
        help="also over HTTP with the impression log to the local broker (started if down)",
    )
    a = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        return run(a, stack)


def run(a, stack) -> int:

    reps = dict(zip(SIZES, (int(x) for x in a.reps.split(","))))
    root = Path(tempfile.mkdtemp(prefix="bench-slate-"))
    store, reg, pairs, labels = serve_world(root, a.events, side_tables=True)
    torch.set_num_threads(1)  # as the server does (build_scorer)
    users = sorted({u for u, _ in pairs})

    # candidates from the whole catalogue (1,682 films): some have no streaming features yet, as in production
    items = sorted(set(load_side_tables("movielens-100k")[1]["item_id"].to_pylist()))
    plans = {n: requests_for(n, reps[n], users, items, seed=n) for n in SIZES}
    rows = []
    sc, guard = scorer_for(store, reg, pairs, labels)
    for n in SIZES:
        rows.append(row("in-process", n, bench_in_process(sc, guard, plans[n])))
        print(rows[-1], flush=True)
    sc.close()
    if not a.no_side:
        sc, guard = scorer_for(store, side_registry(root, reg), pairs, labels)
        assert "age_bucket" in sc.bundle.encoder.config.categorical_fields
        for n in SIZES:
            rows.append(row("in-process, side", n, bench_in_process(sc, guard, plans[n])))
            print(rows[-1], flush=True)
        sc.close()
    log_health = None
    servers: dict[str, tuple[str, ...]] = {} if a.no_http else {"http": ()}
    if a.kafka and servers:
        stack.enter_context(services_up("kafka"))
        topic = f"bench.slate.{int(time.time())}"
        servers["http, impression log"] = ("--impressions-topic", f"{topic}.imp", "--feedback-topic", f"{topic}.fb")
    procs = {}
    try:
        for path, args in servers.items():
            procs[path] = ServerProc(str(root / "reg"), str(root / "features"), extra_args=args)
            fill(procs[path].url, pairs, labels)
        for n in SIZES:
            if not procs:
                break
            for path, lat in bench_http({k: p.port for k, p in procs.items()}, plans[n]).items():
                rows.append(row(path, n, lat))
                print(rows[-1], flush=True)
        if "http, impression log" in procs:  # what the log did with the run's impressions, once it sent them
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                log_health = requests.get(f"{procs['http, impression log'].url}/health").json()["impression_log"]
                if not log_health["queued"] and not log_health["in_flight"]:
                    break
                time.sleep(0.5)
            print("impression log:", log_health, flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
    report(
        "bench_slate",
        rows,
        {
            "events": a.events,
            "impression_log": log_health,
            "model": reg.entry(reg.current()).model_config["kind"],
            "feast_profile": "sqlite",
            "load_average_1m_at_end": os.getloadavg()[0],
            "reference": "the same N candidates as N single-pair requests, same run",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
