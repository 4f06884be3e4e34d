"""Shared helpers for the benchmark scripts: a printed table and a JSON result file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class services_up:
    """Context manager: start the local services a benchmark needs (``reloop.services``, on the ports of the
    environment) if they are down, and stop again only those it started. A benchmark needing Kafka then
    works from a cold machine instead of failing with a connection traceback."""

    def __init__(self, *names: str) -> None:
        self.names, self.started = names, []

    def __enter__(self) -> "services_up":
        from reloop import services

        for name in self.names:
            svc = services.get(name)
            if not svc.status().running:
                print(f"starting {name} for the benchmark ...", flush=True)
                svc.start()
                self.started.append(svc)
        return self

    def __exit__(self, *exc) -> None:
        for svc in reversed(self.started):
            svc.stop()


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print ``rows`` as an aligned table and write them (plus machine info) to results/<name>.json."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    print(f"\nwrote {out}")
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
