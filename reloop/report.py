"""The report of a ``reloop run``: ``summary.json``, PNG plots and a self-contained ``report.html``.

Input is plain data (:class:`RunRecord`): the served predictions with labels
(base and memory-compensated), the trainer's test-then-train predictions, the
alerts, the model versions, the injected shift and per-stage throughput. The
HTML embeds its images as data URIs and needs no server, script or network.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from online_models.gate import RULES as GATE_RULES
from online_models.metrics import auc, gauc, logloss

#: the variants drawn over event time: (key in RunRecord.series, label, colour)
VARIANTS = (
    ("served", "served model", "#1f77b4"),
    ("served+memory", "served model + memory", "#d62728"),
    ("incremental", "incremental trainer (test-then-train)", "#2ca02c"),
)


@dataclass
class Series:
    """Predictions in event-time order: ``ts`` (ms), ``y`` (0/1), ``p`` and the user of each event."""

    ts: np.ndarray
    y: np.ndarray
    p: np.ndarray
    user: np.ndarray

    @classmethod
    def empty(cls) -> Series:
        return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, object))


@dataclass
class RunRecord:
    run_id: str
    dataset: str
    model: str
    series: dict[str, Series]
    alerts: list[dict[str, Any]] = field(default_factory=list)  # each with "ts" (ms) and "summary"
    versions: list[dict[str, Any]] = field(default_factory=list)  # each with "ts" (ms), "version", "reason"
    shift: dict[str, Any] | None = None  # from reloop.inject.Shift
    throughput: dict[str, float] = field(default_factory=dict)  # stage -> events/s
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def metrics_of(s: Series) -> dict[str, float | None]:
    if len(s.y) == 0:
        return {"n": 0, "auc": None, "gauc": None, "logloss": None}
    return {
        "n": int(len(s.y)),
        "auc": _num(auc(s.y, s.p)),
        "gauc": _num(gauc(s.y, s.p, s.user)),
        "logloss": _num(logloss(s.y, s.p)),
    }


def over_time(s: Series, buckets: int = 20) -> dict[str, list]:
    """AUC and logloss in ``buckets`` consecutive equal-count slices of the stream (their mid event time)."""
    out: dict[str, list] = {"ts": [], "auc": [], "logloss": []}
    if len(s.y) < buckets * 10:
        buckets = max(1, len(s.y) // 50)
    if len(s.y) == 0:
        return out
    for part in np.array_split(np.arange(len(s.y)), buckets):
        y, p = s.y[part], s.p[part]
        out["ts"].append(int(s.ts[part][len(part) // 2]))
        out["auc"].append(_num(auc(y, p)) if 0 < y.sum() < len(y) else None)
        out["logloss"].append(_num(logloss(y, p)))
    return out


def freshness(ts: np.ndarray, horizon: np.ndarray) -> dict[str, Any]:
    """How far the served version's ``trained_until_ts`` lies behind each served event.

    ``ts``: event times of the served events in serving order; ``horizon``: the serving version's
    ``trained_until_ts`` for each (negative: unknown). Lag in event-time seconds, and in events: how many
    served events lie after the horizon and before this one. p50 / p99 / max of both.
    """
    ts, horizon = np.asarray(ts, np.int64), np.asarray(horizon, np.int64)
    ok = horizon >= 0
    out: dict[str, Any] = {"n": int(ok.sum())}
    if not ok.any():
        return out
    lag_s = (ts[ok] - horizon[ok]) / 1000.0
    clock = np.maximum.accumulate(ts)
    lag_ev = (np.arange(len(ts)) - np.searchsorted(clock, horizon, side="right"))[ok].clip(min=0)
    for name, v in (("seconds", lag_s), ("events", lag_ev)):
        p50, p99 = np.percentile(v, [50, 99])
        out[name] = {"p50": round(float(p50), 1), "p99": round(float(p99), 1), "max": round(float(v.max()), 1)}
    return out


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def summarize(rec: RunRecord) -> dict[str, Any]:
    variants = {k: metrics_of(s) for k, s in rec.series.items()}
    gain = None
    if variants.get("served", {}).get("auc") is not None and variants.get("served+memory", {}).get("auc") is not None:
        gain = round(variants["served+memory"]["auc"] - variants["served"]["auc"], 6)
    return {
        "run_id": rec.run_id,
        "dataset": rec.dataset,
        "model": rec.model,
        "seconds": round(rec.seconds, 2),
        "counts": rec.counts,
        "variants": variants,
        "memory_auc_gain": gain,
        "throughput_events_per_s": {k: round(v, 1) for k, v in rec.throughput.items()},
        "alerts": rec.alerts,
        "versions": rec.versions,
        "shift": rec.shift,
        "over_time": {k: over_time(s) for k, s in rec.series.items()},
        **rec.extra,
    }


def _dt(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC)


def _marks(ax, rec: RunRecord) -> None:
    for i, v in enumerate(rec.versions):
        ax.axvline(_dt(v["ts"]), color="0.55", ls=":", lw=1, label="model version" if i == 0 else None)
    for i, a in enumerate(rec.alerts):
        ax.axvline(_dt(a["ts"]), color="#ff7f0e", ls="--", lw=1.2, label="drift alert" if i == 0 else None)
    if rec.shift:
        ax.axvline(_dt(rec.shift["start_ts"]), color="k", lw=1.5, label=f"injected {rec.shift['scenario']}")


def plot(rec: RunRecord, out_dir: Path) -> dict[str, Path]:
    # matplotlib here, not at the top: the headless backend must be chosen before pyplot loads, and choosing
    # it at import would change the backend of any program (a notebook) that imports this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    curves = {k: over_time(s) for k, s in rec.series.items()}

    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for key, label, colour in VARIANTS:
        c = curves.get(key)
        if not c or not c["ts"]:
            continue
        x = [_dt(t) for t in c["ts"]]
        axes[0].plot(x, [np.nan if v is None else v for v in c["auc"]], marker="o", ms=3, color=colour, label=label)
        axes[1].plot(x, [np.nan if v is None else v for v in c["logloss"]], marker="o", ms=3, color=colour, label=label)
    for ax, name in zip(axes, ("AUC", "logloss")):
        _marks(ax, rec)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Streaming metrics over event time ({rec.dataset}, {rec.model})")
    axes[0].legend(loc="best", fontsize=8)
    axes[1].xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    fig.tight_layout()
    paths["metrics"] = out_dir / "metrics_over_time.png"
    fig.savefig(paths["metrics"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.5))
    base, mem = curves.get("served"), curves.get("served+memory")
    if base and mem and base["ts"]:
        gain = [None if a is None or b is None else 100 * (b - a) for a, b in zip(base["auc"], mem["auc"])]
        ax.bar(
            [_dt(t) for t in base["ts"]],
            [0 if g is None else g for g in gain],
            width=3,
            color=["#d62728" if (g or 0) >= 0 else "#7f7f7f" for g in gain],
        )
    _marks(ax, rec)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("AUC gain (points)")
    ax.set_title("Error-compensation memory: AUC(served + memory) - AUC(served)")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    fig.tight_layout()
    paths["memory_gain"] = out_dir / "memory_gain.png"
    fig.savefig(paths["memory_gain"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3))
    stages = list(rec.throughput)
    ax.barh(stages, [rec.throughput[s] for s in stages], color="#1f77b4")
    for i, s in enumerate(stages):
        ax.text(rec.throughput[s], i, f" {rec.throughput[s]:,.0f}/s", va="center", fontsize=8)
    ax.set_xlabel("events per second")
    ax.set_title("Throughput per stage")
    fig.tight_layout()
    paths["throughput"] = out_dir / "throughput.png"
    fig.savefig(paths["throughput"], dpi=90)
    plt.close(fig)

    chunks = ((rec.extra.get("label_delay") or {}).get("label_free") or {}).get("chunks") or []
    if chunks:
        fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
        x = [_dt(c["ts"]) for c in chunks]
        for ax, metric in zip(axes, ("auc", "logloss")):
            ax.plot(
                x,
                [c[f"expected_{metric}"] for c in chunks],
                marker="o",
                ms=3,
                ls="--",
                color="#9467bd",
                label="label-free estimate (at serving time)",
            )
            ax.plot(
                x,
                [c[f"realised_{metric}"] for c in chunks],
                marker="o",
                ms=3,
                color="#d62728",
                label="realised (once the labels arrived)",
            )
            ax.set_ylabel(metric.upper() if metric == "auc" else metric)
            ax.grid(alpha=0.3)
        axes[0].set_title("Served model + memory: expected metric from calibrated probabilities vs realised")
        axes[0].legend(loc="best", fontsize=8)
        axes[1].xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
        fig.autofmt_xdate()
        fig.tight_layout()
        paths["label_free"] = out_dir / "label_free_estimate.png"
        fig.savefig(paths["label_free"], dpi=90)
        plt.close(fig)
    return paths


def write_report(rec: RunRecord, out_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.json``, the PNGs and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rec)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    images = plot(rec, out)
    (out / "report.html").write_text(_html(summary, images))
    return {"summary": out / "summary.json", "html": out / "report.html", **images}


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>'
        f"{html.escape(alt)}</figcaption></figure>"
    )


def _when(ms: Any) -> str:
    return _dt(ms).strftime("%Y-%m-%d %H:%M") if isinstance(ms, (int, float)) else ""


def _html(s: dict[str, Any], images: dict[str, Path]) -> str:
    variants = [{"variant": k, **v} for k, v in s["variants"].items()]
    alerts = [
        {"event time": _when(a.get("ts")), "action": a.get("action", "alert"), "summary": a.get("summary", "")}
        for a in s["alerts"]
    ]
    versions = [
        {
            "event time": _when(v.get("ts")),
            "version": v.get("version"),
            "trained until": _when(v.get("trained_until_ts")),
            "first served": _when(v.get("first_served_ts")),
            "events served": v.get("served_events"),
            "reason": v.get("reason", "")[:90],
        }
        for v in s["versions"]
    ]
    counts = [{"stage": k, "count": v} for k, v in s["counts"].items()]
    thr = [{"stage": k, "events/s": int(round(v))} for k, v in s["throughput_events_per_s"].items()]
    wall = s.get("seconds") or 0.0
    budget = [
        {"stage": stage, "activity": what, "seconds": f"{sec:,.1f}", "share of the run": f"{sec / wall:.0%}"}
        for stage, acts in s.get("time_budget_s", {}).items()
        for what, sec in sorted(acts.items(), key=lambda kv: -kv[1])
        if wall
    ]
    deploys = [
        {
            "event time": _when(e.get("ts")),
            "what": e.get("what"),
            "detail": ", ".join(f"{k}={_fmt(v)}" for k, v in e.items() if k not in ("ts", "what")),
        }
        for e in s.get("deployer", [])
    ]
    promos = [
        {
            "event time": _when(p.get("ts")),
            "version": p["version"],
            "previous": p["previous"],
            "events": p["n"],
            "AUC new": p["auc_new"],
            "AUC previous": p["auc_previous"],
            "logloss new": p["logloss_new"],
            "logloss previous": p["logloss_previous"],
        }
        for p in s.get("promotions", [])
    ]
    incidents = [
        {
            "incident": i["id"],
            "start": _when(i.get("start_ts")),
            "events": f"{i['start_event']:,}-{i['last_event']:,}",
            "alerts": i["alerts"],
            "evidence": ", ".join(i.get("evidence", [])[:5]),
            "actions": "; ".join(
                a.get("what", "") + (f" {a['version']}" if a.get("version") else "")
                for a in i.get("actions", [])
                if a.get("what") != "gate"
            ),
            "resolution": i.get("resolution") or i.get("status"),
        }
        for i in s.get("incidents", [])
    ]
    gate = [
        {
            "event time": _when(g.get("events_ts", [None])[0]),
            "kind": g["kind"],
            "candidate": g["version"],
            "current": g["current"],
            "n": g["n"],
            "logloss diff": g["diff"],
            "interval": f"[{g['lo']:+.4f}, {g['hi']:+.4f}]",
            "decision": "promote" if g["promote"] else "keep",
        }
        for g in s.get("gate", [])
    ]
    gate_pct = round(100 * (s.get("gate") or [{}])[0].get("level", 0.9))
    fr = s.get("freshness") or {}
    # event-time lag in days (the raw seconds are in summary.json)
    fresh = [{"lag in": "events", **{q: fr["events"][q] for q in ("p50", "p99", "max")}}] if "events" in fr else []
    if "seconds" in fr:
        fresh.append(
            {"lag in": "event-time days", **{q: round(fr["seconds"][q] / 86400, 2) for q in ("p50", "p99", "max")}}
        )
    delay = s.get("label_delay") or {}
    est = delay.get("label_free") or {}
    est_rows = [
        {
            "last impression": _when(c["ts"]),
            "impressions": c["hi"] - c["lo"],
            "expected AUC": c["expected_auc"],
            "realised AUC": c["realised_auc"],
            "expected logloss": c["expected_logloss"],
            "realised logloss": c["realised_logloss"],
        }
        for c in est.get("chunks", [])
    ]
    label_free = ""
    if delay:
        gap = (
            ""
            if est.get("mae_auc") is None
            else f"<p>Mean absolute gap, estimate vs realised: AUC <b>{est['mae_auc']:.4f}</b>, logloss "
            f"<b>{est['mae_logloss']:.4f}</b>; monitor alarms on the estimate: {len(est.get('monitor_alarms', []))}"
            f".</p>"
        )
        label_free = (
            f"<h2>Label-free estimate while labels are pending (CBPE)</h2><p>Labels arrive "
            f"{html.escape(str(delay.get('delay')))} after the impression (attribution window "
            f"{delay.get('attribution_window_s', 0) / 60:.0f} min). For each chunk of impressions the "
            f"served probabilities, calibrated (Platt) on outcomes known before the chunk, give the expected "
            f"metric at serving time; the realised one follows once the labels are in.</p>{gap}"
            f"{_img(images['label_free'], 'Label-free estimate vs realised metric') if 'label_free' in images else ''}"
            f"{_table(est_rows)}{html.escape(est.get('note', ''))}"
        )
    errors = "".join(f"<li>{html.escape(e)}</li>" for e in s.get("errors", []))
    gain = s.get("memory_auc_gain")
    shift = s.get("shift")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>reloop run {html.escape(s["run_id"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #666; font-size: 0.9em; }} .kpi {{ font-size: 1.2em; }}
</style></head><body>
<h1>reloop run <code>{html.escape(s["run_id"])}</code></h1>
<p class="kpi">Dataset <b>{html.escape(s["dataset"])}</b>, model <b>{html.escape(s["model"])}</b>,
{s["seconds"]:.0f} s wall clock. Memory AUC gain on the served stream:
<b>{"–" if gain is None else f"{100 * gain:+.2f} points"}</b>.</p>
{
        f"<p>Side features: <b>{', '.join(html.escape(f) for f in s['side_features']['fields'])}</b> (user profile, "
        f"item catalogue; served as <code>{html.escape(s['side_features']['feature_service'])}</code>).</p>"
        if s.get("side_features")
        else ""
    }
{
        f"<p>Injected drift: <b>{html.escape(shift['scenario'])}</b> from {_when(shift['start_ts'])} "
        f"({shift['changed_labels']:,} labels changed).</p>"
        if shift
        else ""
    }
<h2>Quality per variant</h2>{_table(variants)}
{
        _img(
            images["metrics"],
            "Streaming AUC and logloss over event time; vertical lines: model versions (dotted), drift alerts (dashed), injected shift (solid)",
        )
    }
{_img(images["memory_gain"], "AUC gain of the error-compensation memory per slice of the stream")}
<h2>Freshness: how far the served version's trained_until_ts lies behind each served event</h2>{_table(fresh)}
{label_free}
<h2>Incidents (alerts of one shift, grouped)</h2>{_table(incidents)}
<h2>The deployment gate: paired block bootstrap on per-event logloss differences (candidate - current)</h2>
<ul>{"".join(f"<li><b>{k}</b>: {html.escape(r.format(pct=gate_pct))}</li>" for k, r in GATE_RULES.items())}</ul>{
        _table(gate)
    }
<h2>Drift alerts (raw)</h2>{_table(alerts)}
<h2>Model versions</h2>{_table(versions)}
<h2>After each model change: new vs previous version on the same events</h2>{_table(promos)}
<h2>Deployment decisions</h2>{_table(deploys)}
{f"<h2>Errors</h2><ul>{errors}</ul>" if errors else ""}
<h2>Stages</h2>{_table(counts)}{_table(thr)}
<h2>Where the time went (wall seconds per stage; each stage runs in its own thread or process)</h2>{_table(budget)}
{_img(images["throughput"], "Throughput per stage")}
</body></html>
"""
