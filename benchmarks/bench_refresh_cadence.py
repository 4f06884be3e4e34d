"""How often should serving take the trainer's checkpoint? One pass of test-then-train, several cadences.

The incremental trainer learns the stream in mini-batches; for each cadence R a *served* copy of its weights
is refreshed every R examples, after a delay of ``gate_delay`` events (what the paired gate waits for, see
jobs/deploy.py) plus ``lag`` events (how far serving runs ahead of the trainer, ``--max-lag``). Every event is
scored by every served copy before the trainer learns it, so all cadences see the same events. Prints AUC
and logloss per cadence, against the trainer's own prequential predictions (R = 0, no delay).

Run it on a stream the defaults are *not* measured on (a synthetic scenario by default), so choosing the
cadence does not tune on the test data::

    python -m benchmarks.bench_refresh_cadence --dataset 'synthetic:stable?n=60000&seed=3'
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from jobs.trainer import feature_columns
from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.metrics import auc, logloss
from online_models.models import build_model, model_config_for
from pipelines.aggregates import FeatureState, compute_features
from reloop.datasets import load_dataset


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic:stable?n=60000&seed=3")
    p.add_argument("--model", default="dcnv2")
    p.add_argument("--cadences", default="500,1000,2000,5000,10000")
    p.add_argument("--gate-delay", type=int, default=500)
    p.add_argument("--lag", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    table, _, _ = compute_features(load_dataset(a.dataset), FeatureState.empty())
    enc = FeatureEncoder(EncoderConfig(numeric_fields=tuple(feature_columns(table.column_names)))).fit(
        table.slice(0, a.warmup)
    )
    mc = model_config_for(a.model, enc.config)
    model = build_model(mc)

    def snapshot() -> torch.nn.Module:
        m = build_model(mc)
        m.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        return m.eval()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cadences = [int(c) for c in a.cadences.split(",")]
    delay = a.gate_delay + a.lag
    served: dict[int, torch.nn.Module | None] = {r: None for r in cadences}
    queued: dict[int, list[tuple[int, torch.nn.Module]]] = {r: [] for r in cadences}  # (serve from, snapshot)
    preds: dict[int, list[np.ndarray]] = {r: [] for r in [0, *cadences]}
    ys: list[np.ndarray] = []
    learned = 0
    for lo in range(0, table.num_rows, a.batch_size):
        batch = enc.encode(table.slice(lo, a.batch_size))
        y = batch["label"]
        model.eval()
        with torch.no_grad():
            if learned >= a.warmup:
                preds[0].append(torch.sigmoid(model(batch)[0]).numpy())
                for r in cadences:
                    while queued[r] and queued[r][0][0] <= lo:
                        served[r] = queued[r].pop(0)[1]
                    preds[r].append(torch.sigmoid(served[r](batch)[0]).numpy())
                ys.append(y.numpy())
        model.train()
        logits, _ = model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, y) + model.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before, learned = learned, learned + len(y)
        if learned < a.warmup:
            continue
        for r in cadences:
            if served[r] is None:
                served[r] = snapshot()  # the bootstrap version serves at once
            elif before // r != learned // r:
                queued[r].append((learned + delay, snapshot()))
    y = np.concatenate(ys)
    out = {"dataset": a.dataset, "events": int(len(y)), "delay_events": delay, "results": {}}
    for r, ps in preds.items():
        pr = np.concatenate(ps)
        out["results"]["trainer (prequential)" if r == 0 else f"refresh every {r}"] = {
            "auc": round(float(auc(y, pr)), 4),
            "logloss": round(float(logloss(y, pr)), 4),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
