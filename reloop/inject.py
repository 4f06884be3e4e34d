"""Inject a controlled drift into a real dataset, so the loop's reaction can be watched on real data.

``reloop run --inject-drift SCENARIO`` applies one of these to the event table
before it is replayed, from the event at fraction ``at`` of the stream (in
time order) on. Everything is seeded; the shift position is reported so the
report can mark it on the time axis.

- ``abrupt_interest``: for a random half of the items, every later label is
  flipped (users now like what they disliked): the model's ranking goes wrong
  where it was confident, so loss and error jump.
- ``gradual_interest``: the same flip, applied to each later event with a
  probability rising linearly from 0 to 1 over ``width`` of the stream.
- ``abrupt_ctr``: every later positive becomes a negative with probability
  ``drop`` (a click-rate level shift).
- ``abrupt_inversion``: every later label is flipped (tastes invert): the
  features the model learnt to trust (all-time click rates, ids) now point
  the wrong way, only the short windows follow; a clear test of retraining.

>>> import pyarrow as pa
>>> t = pa.table({"event_id": [str(i) for i in range(10)], "ts": list(range(10)), "user_id": ["u"] * 10,
...               "item_id": ["a", "b"] * 5, "label": pa.array([1] * 10, pa.int8())})
>>> out, shift = inject_drift(t, "abrupt_ctr", at=0.5, seed=0, drop=1.0)
>>> out["label"].to_pylist(), shift.start_index, shift.start_ts
([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], 5, 5)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from online_models.errors import ReloopError

SCENARIOS = ("abrupt_interest", "gradual_interest", "abrupt_ctr", "abrupt_inversion")


class InjectionError(ReloopError, ValueError):
    """An unknown scenario or parameter."""


@dataclass(frozen=True)
class Shift:
    scenario: str
    start_index: int
    end_index: int
    start_ts: int
    end_ts: int
    changed_labels: int

    def to_dict(self) -> dict:
        return asdict(self)


def inject_drift(
    table: pa.Table, scenario: str, *, at: float = 0.6, seed: int = 0, width: float = 0.1, drop: float = 0.7
) -> tuple[pa.Table, Shift]:
    """A copy of ``table`` (time-sorted events) with ``scenario`` applied from fraction ``at`` on."""
    if scenario not in SCENARIOS:
        raise InjectionError(f"unknown drift scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if not 0.0 < at < 1.0 or not 0.0 < width <= 1.0 or not 0.0 <= drop <= 1.0:
        raise InjectionError(
            f"need 0 < at < 1, 0 < width <= 1, 0 <= drop <= 1; got at={at}, width={width}, drop={drop}"
        )
    n = table.num_rows
    rng = np.random.default_rng(seed)
    start = int(n * at)
    end = start if scenario.startswith("abrupt") else min(n - 1, start + int(n * width))
    labels = table["label"].to_numpy().astype(np.int8).copy()
    idx = np.arange(n)
    if scenario == "abrupt_inversion":
        apply = idx >= start
        labels[apply] = 1 - labels[apply]
    elif scenario.endswith("interest"):
        items = table["item_id"].to_numpy(zero_copy_only=False).astype(object)
        uniq = np.unique(items)
        flipped = set(rng.choice(uniq, size=len(uniq) // 2, replace=False).tolist())
        hit = np.fromiter((it in flipped for it in items), bool, n)
        ramp = np.clip((idx - start) / max(1, end - start), 0, 1) if end > start else (idx >= start).astype(float)
        apply = hit & (idx >= start) & (rng.random(n) < ramp)
        labels[apply] = 1 - labels[apply]
    else:
        apply = (idx >= start) & (labels == 1) & (rng.random(n) < drop)
        labels[apply] = 0
    ts = table["ts"].to_numpy()
    out = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int8()))
    return out, Shift(scenario, start, end, int(ts[start]), int(ts[end]), int(apply.sum()))
