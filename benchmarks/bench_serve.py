"""Scoring latency and throughput: in-process path vs HTTP, with and without the memory, uvicorn vs Ray Serve.

One run measures, on the same Feast store (SQLite, features of the first
MovieLens events) and the same registry model:

1. ``feast``: ``get_online_features`` of one (user, item) alone;
2. ``in-process``: :meth:`Scorer.score` (Feast lookup + encode + model + memory), with and without memory;
3. ``http``: ``POST /score`` on the uvicorn server (a separate process), with and without memory:
   sequential latency (p50/p99 over keep-alive requests) and throughput (concurrent client threads);
4. ``ray-serve``: the same handlers as a Ray Serve deployment (``--backend ray``), with memory.

The memory is filled with real outcomes (``/feedback``) before measuring.
Latency requests are alternated between the variants (in-process: both
scorers; HTTP: all servers, one request in flight), so a load change on a
shared machine hits every variant alike. The client shares the 2 cores with
the server, so req/s is a floor. Ratios are against the in-process path of
the same run; the 1-minute load average is recorded with the results.

    python benchmarks/bench_serve.py [--requests 500] [--seconds 5] [--threads 4] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the set-up, the percentiles and the server process are shared with bench_slate.py
import requests
import torch

from benchmarks.common import ServerProc, fill  # noqa: E402,F401
from benchmarks.common import pct as _pct
from benchmarks.common import serve_world as setup
from jobs.scoring import FeastLookup, Scorer, ScorerConfig


def bench_in_process(store, reg, pairs, labels, n: int) -> dict:
    """Scorers with and without memory (same model, same memory contents), requests alternated between them
    so load changes on a shared machine hit both alike."""

    scorers = {}
    for mem in (True, False):
        sc = Scorer(reg, lambda fs: FeastLookup(store, fs), ScorerConfig(use_memory=mem))
        sc.reload()
        for (u, i), y in zip(pairs[:1000], labels[:1000]):  # fill the memory with real outcomes
            sc.feedback(sc.score(u, i)["request_id"], y)
        scorers["in_process_memory" if mem else "in_process"] = sc
    lat: dict[str, list[float]] = {"in_process_memory": [], "in_process": [], "feast_lookup": []}
    lookup = scorers["in_process"].bundle.lookup
    rng = np.random.default_rng(0)
    for k in rng.integers(0, len(pairs), n):
        u, i = pairs[k]
        for key, sc in scorers.items():
            t0 = time.perf_counter()
            sc.score(u, i)
            lat[key].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lookup.lookup_dict([u], [i])
        lat["feast_lookup"].append(time.perf_counter() - t0)
    return {k: _pct(v) for k, v in lat.items()}


def latency_http(urls: dict[str, str], pairs, n: int) -> dict:
    """Sequential keep-alive requests, alternated between the servers (one request in flight at a time)."""

    sessions = {k: requests.Session() for k in urls}
    lat: dict[str, list[float]] = {k: [] for k in urls}
    errors = {k: 0 for k in urls}
    rng = np.random.default_rng(0)
    for k in rng.integers(0, len(pairs), n):
        u, i = pairs[k]
        for key, url in urls.items():
            t0 = time.perf_counter()
            r = sessions[key].post(f"{url}/score", json={"user_id": u, "item_id": i})
            lat[key].append(time.perf_counter() - t0)
            errors[key] += r.status_code != 200
    return {k: {**_pct(v), "errors": errors[k]} for k, v in lat.items()}


def throughput_http(url: str, pairs, seconds: float, threads: int) -> float:

    done, stop = [0] * threads, threading.Event()

    def client(j: int) -> None:
        sess = requests.Session()
        r2 = np.random.default_rng(j)
        while not stop.is_set():
            u, i = pairs[int(r2.integers(0, len(pairs)))]
            if sess.post(f"{url}/score", json={"user_id": u, "item_id": i}).status_code == 200:
                done[j] += 1

    ts = [threading.Thread(target=client, args=(j,)) for j in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Serve backend")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_serve.json"))
    a = ap.parse_args(argv)

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    store, reg, pairs, labels = setup(root, a.events)
    torch.set_num_threads(1)  # as the server does (the trainer of the set-up uses 2)
    reg_uri, repo = str(root / "reg"), str(root / "features")
    res: dict = {
        "events": a.events,
        "model": reg.entry(reg.current()).model_config["kind"],
        "feast_profile": "sqlite",
        "cpus": os.cpu_count(),
    }
    res.update(bench_in_process(store, reg, pairs, labels, a.requests))
    backends = {"http_memory": ("http", True), "http": ("http", False)}
    if not a.no_ray:
        backends["ray_memory"] = ("ray", True)
    servers = {}
    try:
        for key, (backend, mem) in backends.items():
            servers[key] = ServerProc(reg_uri, repo, backend, mem)
            fill(servers[key].url, pairs, labels)
        res.update(latency_http({k: srv.url for k, srv in servers.items()}, pairs, a.requests))
        for key, srv in servers.items():
            res[key]["req_per_s"] = throughput_http(srv.url, pairs, a.seconds, a.threads)
            res[key]["threads"] = a.threads
    finally:
        for srv in servers.values():
            srv.stop()
    res["load_average_1m_at_end"] = os.getloadavg()[0]
    ref = res["in_process_memory"]["p50_ms"]
    rows = [
        ("feast_lookup", "Feast get_online_features (1 row)"),
        ("in_process_memory", "in-process score, memory"),
        ("in_process", "in-process score, no memory"),
        ("http_memory", "HTTP /score uvicorn, memory"),
        ("http", "HTTP /score uvicorn, no memory"),
        ("ray_memory", "HTTP /score Ray Serve, memory"),
    ]
    print(f"\n{'path':40s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'p50 / in-proc':>14s}")
    for key, label in rows:
        if key in res:
            r = res[key]
            rps = f"{r['req_per_s']:8.0f}" if "req_per_s" in r else f"{'-':>8s}"
            print(f"{label:40s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {rps} {r['p50_ms'] / ref:14.2f}")
    res["ratios"] = {
        "memory_overhead_in_process_p50": res["in_process_memory"]["p50_ms"] / res["in_process"]["p50_ms"],
        "http_over_in_process_p50": res["http_memory"]["p50_ms"] / ref,
    }
    if "ray_memory" in res:
        res["ratios"]["ray_serve_over_uvicorn_p50"] = res["ray_memory"]["p50_ms"] / res["http_memory"]["p50_ms"]
        res["ratios"]["ray_serve_over_uvicorn_req_s"] = res["ray_memory"]["req_per_s"] / res["http_memory"]["req_per_s"]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nratios: {json.dumps({k: round(v, 2) for k, v in res['ratios'].items()})}\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
