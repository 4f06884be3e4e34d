"""The independent reference for the feature math: a slow, obvious pandas recomputation from raw events.

Shared by the unit tests of :mod:`pipelines.aggregates` and the feature job's integration tests, so both
check against one definition of "features as of strictly before the event".
"""

from __future__ import annotations

import pandas as pd

from pipelines.aggregates import AggregateConfig


def pandas_features(df: pd.DataFrame, entity: str, ids, times, cfg: AggregateConfig = AggregateConfig()
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
