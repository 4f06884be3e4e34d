"""The independent reference for the feature math: a slow, obvious pandas recomputation from raw events.

Shared by the unit tests of :mod:`pipelines.aggregates` and the feature job's integration tests, so both
check against one definition of "features as of strictly before the event".
"""

from __future__ import annotations

import pandas as pd

from pipelines.aggregates import AggregateConfig


def pandas_features(
    df: pd.DataFrame, entity: str, ids, times, cfg: AggregateConfig = AggregateConfig()
) -> pd.DataFrame:
    """Features of ``entity`` ids as of strictly before each time, one query at a time."""
    groups = {k: g.sort_values("ts", kind="stable") for k, g in df.groupby(f"{entity}_id", sort=False)}
    m, prior = cfg.prior_weight, cfg.prior_ctr
    rows = []
    for q, t in zip(ids, times):
        g = groups.get(q, df.iloc[:0])
        past = g[g.ts < t]
        r = {}
        for name, w in (*cfg.windows_ms, ("all", None)):
            win = past if w is None else past[past.ts >= t - w]
            imp, pos = len(win), int(win.label.sum())
            r[f"{entity}_imp_{name}"], r[f"{entity}_pos_{name}"] = imp, pos
            r[f"{entity}_ctr_{name}"] = (pos + m * prior) / (imp + m)
        r[f"{entity}_secs_since_last"] = (t - past.ts.max()) / 1000.0 if len(past) else -1.0
        if entity == "user":
            r["user_last_items"] = list(past.item_id[::-1][: cfg.last_n])
        rows.append(r)
    return pd.DataFrame(rows)


def pandas_join(imps: pd.DataFrame, feedback: pd.DataFrame, window_ms: int, watermark: int) -> pd.DataFrame:
    """The attribution join of contract v2 recomputed in pandas (see :mod:`pipelines.join`), no features.

    One row per impression the join has emitted by ``watermark``: positives (first click within
    ``[ts, ts + window]``) and negatives whose window closed (``ts + window < watermark``), with
    ``label`` and ``label_ts``. Duplicate impression ids keep their first.
    """
    import numpy as np

    imps = imps.drop_duplicates("impression_id", keep="first")
    m = feedback[feedback.kind == "click"].merge(imps[["impression_id", "ts"]], on="impression_id", suffixes=("_c", ""))
    m = m[(m.ts_c >= m.ts) & (m.ts_c <= m.ts + window_ms)]
    first = m.groupby("impression_id").ts_c.min()
    out = imps.copy()
    out["label"] = out.impression_id.isin(first.index).astype(int)
    out["label_ts"] = np.where(
        out.label == 1, out.impression_id.map(first).fillna(0).astype("int64"), out.ts + window_ms
    )
    return out[(out.label == 1) | (out.ts + window_ms < watermark)].reset_index(drop=True)


def pandas_join_features(
    imps: pd.DataFrame, clicks: pd.DataFrame, sample: pd.DataFrame, cfg: AggregateConfig = AggregateConfig()
) -> pd.DataFrame:
    """Features of the sampled examples: impression counts, recency, last items from the impressions
    strictly before each; positives from the attributed clicks that arrived strictly before it.

    ``clicks``: one row per attributed click (``user_id, item_id, ts`` = the click time).
    """
    m, prior = cfg.prior_weight, cfg.prior_ctr
    ev = imps.assign(label=0)
    cl = clicks.assign(label=1)
    parts = []
    for entity in ("user", "item"):
        a = pandas_features(ev, entity, sample[f"{entity}_id"], sample.ts, cfg)
        b = pandas_features(cl, entity, sample[f"{entity}_id"], sample.ts, cfg)
        for name in [n for n, _ in cfg.windows_ms] + ["all"]:
            a[f"{entity}_pos_{name}"] = b[f"{entity}_imp_{name}"]
            a[f"{entity}_ctr_{name}"] = (a[f"{entity}_pos_{name}"] + m * prior) / (a[f"{entity}_imp_{name}"] + m)
        parts.append(a)
    return pd.concat(parts, axis=1)
