"""The cost of issue 18's request checks: the old and the new ``/score``/``/feedback`` handlers, A/B.

Both handlers run in one process on the same :class:`jobs.scoring.Scorer` (same model, memory, Feast
store), requests alternated one by one, so the shared machine's load hits both alike:

- ``old``: the handler of c9242f2 (``--old PATH`` to its ``jobs/serve.py``): ``json.loads`` then
  :meth:`Scorer.score`;
- ``new``: :func:`jobs.serve.handle`: strict UTF-8 + depth check, context checks, the slate path with
  impression ids (one candidate), and for ``/feedback`` the guard.

Also a slate of 100 and of 1,000 candidates (one batched pass) against 100 single-pair requests.

    python benchmarks/bench_serve_guard.py --old /path/to/c9242f2/jobs/serve.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from benchmarks.bench_serve import _pct, setup  # noqa: E402
from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import handle, score_slate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the old jobs/serve.py to compare against")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_guard.json"))
    a = ap.parse_args()

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("old_serve", a.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_serve"] = old  # pydantic resolves the annotations through the module
    spec.loader.exec_module(old)
    root = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    store, reg, pairs, labels = setup(root, a.events)
    sc = Scorer(reg, lambda fs: FeastLookup(store, fs), ScorerConfig())
    sc.reload()
    guard = FeedbackGuard(GuardConfig(max_per_pair=10**9, max_per_user=10**9, max_per_item=10**9))
    for (u, i), y in zip(pairs[:1000], labels[:1000]):
        sc.feedback(sc.score(u, i)["request_id"], y)
    lat = {k: [] for k in ("score_old", "score_new", "feedback_old", "feedback_new")}
    rng = np.random.default_rng(0)
    for k in rng.integers(0, len(pairs), a.requests):
        u, i = pairs[k]
        body = json.dumps({"user_id": u, "item_id": i, "context": {}}).encode()
        calls = [
            ("old", lambda: old.handle(sc, "POST", "/score", body)),
            ("new", lambda: handle(sc, "POST", "/score", body, guard, "bench")),
        ]
        if k % 2:  # alternate which goes first (the second finds Feast's pages warm)
            calls.reverse()
        outs = {}
        for name, call in calls:
            t0 = time.perf_counter()
            st, outs[name] = call()
            lat[f"score_{name}"].append(time.perf_counter() - t0)
            assert st == 200, outs[name]
        out_old, out_new = outs["old"], outs["new"]
        y = int(labels[k])
        fb_old = json.dumps({"request_id": out_old["request_id"], "label": y}).encode()
        fb_new = json.dumps({"impression_id": out_new["impression_id"], "label": y}).encode()
        t0 = time.perf_counter()
        assert old.handle(sc, "POST", "/feedback", fb_old)[0] == 200
        t1 = time.perf_counter()
        assert handle(sc, "POST", "/feedback", fb_new, guard, "bench")[0] == 200
        t2 = time.perf_counter()
        lat["feedback_old"].append(t1 - t0)
        lat["feedback_new"].append(t2 - t1)
    slates = {}
    users = sorted({u for u, _ in pairs})
    items = sorted({i for _, i in pairs})
    for n in (100, 1000):
        xs, singles = [], []
        for r in range(20):
            u = users[r % len(users)]
            cand = [items[(r * 7 + j) % len(items)] for j in range(n)]
            t0 = time.perf_counter()
            score_slate(sc, guard, u, cand, {})
            xs.append(time.perf_counter() - t0)
            if n == 100:
                t0 = time.perf_counter()
                for it in cand:
                    sc.score(u, it)
                singles.append(time.perf_counter() - t0)
        slates[f"slate_{n}"] = _pct(xs)
        if singles:
            slates["100_single_requests"] = _pct(singles)
    res = {k: _pct(v) for k, v in lat.items()} | slates
    res["ratio_score_p50"] = res["score_new"]["p50_ms"] / res["score_old"]["p50_ms"]
    res["ratio_score_p99"] = res["score_new"]["p99_ms"] / res["score_old"]["p99_ms"]
    res["ratio_feedback_p50"] = res["feedback_new"]["p50_ms"] / res["feedback_old"]["p50_ms"]
    print(f"\n{'path':28s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k:28s} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f}")
    print({k: round(v, 3) for k, v in res.items() if not isinstance(v, dict)})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
