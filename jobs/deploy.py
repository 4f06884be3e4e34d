"""Deployment: candidates, the one evaluation gate, and the deployer behind the monitor loop's actions.

Every change of the served model goes through :meth:`Deployer.gate`, whatever asked for it:

- **refresh**: the incremental trainer's checkpoints, offered on a cadence (a registry version every
  ``--refresh-every`` examples learned);
- **retrain**: a model fitted on Ray after the drift policy asked for one;
- **rollback**: the previous model, when the policy's watch finds the newly promoted one worse.

The gate compares the candidate and the served model **paired, on the same events, the newest that
neither had learned from**: events served by the current version whose event time lies after the
candidate's ``trained_until_ts`` (the current version learned nothing after its own, earlier, horizon).
The current model's predictions are the ones it served (recorded before the label arrived); the
candidate's are computed on the same rows. The statistics (a block-bootstrap interval of the mean
per-event logloss difference, and the rule per kind) are :func:`online_models.gate.paired_test`.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.examples import ExampleStore
from jobs.retrain import RetrainConfig, RetrainWorker, run_retrains
from jobs.scoring import horizon_of, load_bundle
from online_models.errors import ReloopError
from online_models.gate import GateDecision, GateError, paired_test
from online_models.models import predict_table
from online_models.settings import MODEL_ARCH


class DeployError(ReloopError, RuntimeError):
    """A deployment step that cannot be carried out now (too few events for the gate, no window)."""


@dataclass(frozen=True)
class Candidate:
    """A model version waiting for the evaluation gate.

    ``kind`` is how it is judged (``retrain``: it must show evidence it is better; ``refresh``: promoted
    unless there is evidence it is worse)."""

    version: str
    job_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    kind: str = "retrain"
    start: str = ""  # how a retrain began: "cold" or "warm from <version>"


@dataclass(frozen=True)
class Evaluation:
    """The gate's verdict: the candidate against the current model on the holdout slot.

    ``current_metrics["logloss"]``, when given, is the reference of the rollback watch after promotion.
    """

    better: bool
    candidate_metrics: dict[str, float]
    current_metrics: dict[str, float]
    reason: str = ""
    decision: dict[str, Any] | None = None


@dataclass
class DeployConfig:
    """How the deployer gates and retrains (``reloop run`` fills it from its options)."""

    examples_uri: str
    registry_uri: str
    work_dir: str  # Ray Train run directory parent
    model: str = "dcnv2"
    #: a cold retrain's model shape (the config's ``model`` section; empty: online_models.settings.MODEL_ARCH)
    hash_buckets: int = MODEL_ARCH["hash_buckets"]
    architecture: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    memory: dict[str, Any] = field(default_factory=dict)
    refresh: bool = True  # offer the trainer's checkpoints to serving
    gate_events: int = 1000  # the newest paired events the gate decides on
    gate_min_events: int = 500  # a decision waits until this many exist
    gate_level: float = 0.90  # two-sided interval; each end a one-sided 95 % bound
    gate_block: int = 25  # bootstrap block length (events)
    gate_margin: float = 0.0  # retrain / rollback: minimum gain, a fraction of the current logloss
    retrain_window: int = 20_000
    #: Ray Train's storage_path (None: <work_dir>/ray_train); an object-store URI on a cluster
    ray_train_uri: str | None = None
    retrain_workers: int = 1  # TorchTrainer workers (ray.retrain_workers)
    retrain_placement: str = "PACK"  # their placement strategy (ray.retrain_placement)
    retrain_min_rows: int = 3000
    retrain_lookback: int = 1000
    holdout: int = 1000  # newest served events kept out of a retrain's window
    #: how a retrain starts: "cold" (a fresh model on the window), "warm" (the served model fine-tuned on the
    #: window plus a replay sample of older examples), or "both" (fit both, gate both, serve the better one
    #: that passes; the report says which won where)
    retrain_start: str = "both"
    replay_ratio: float = 0.5
    #: after a retrain whose candidates the gate rejected, further requests wait this many served events,
    #: doubled with each rejection in a row: the refreshed incremental model already tracks the stream, and
    #: a retrain pauses it at full replay speed
    retrain_backoff: int = 10_000
    #: side features: the side tables' batch sources a retrain joins its window with (None: none)
    side_tables_uri: str | None = None


class Deployer:
    """Carries out the policy's requests and promotes versions through the one gate (see the module doc).

    ``live`` is the serving loop (:class:`reloop.live.ServingLoop`): its trace (what was served, with which
    version), its buffer of recent rows and its served bundle.
    """

    def __init__(self, registry, live, cfg: DeployConfig) -> None:
        self.registry, self.live, self.cfg = registry, live, cfg
        self.monitor = None  # set by the run (the MonitorLoop)
        #: called with a promoted retrain's version (the run lets the incremental trainer take it over)
        self.on_promoted = None
        #: a long-lived RetrainWorker actor (see start_retrain_worker): single-worker retrains run on it
        self.retrain_worker = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retrain")
        self.pending: concurrent.futures.Future | None = None
        self.considered: set[str] = set()
        self.offered: str | None = None  # the refresh candidate waiting for gate events
        self.events: list[dict[str, Any]] = []  # what the deployer did, for the report
        self.decisions: list[dict[str, Any]] = []  # every gate decision
        self.retrains = 0
        self.rollbacks = 0
        self.rejected_in_a_row = 0
        self.backoff_until = 0
        self.ready: list[Candidate] = []  # retrained candidates waiting for gate events
        self.retrain_comparisons: list[dict[str, Any]] = []  # warm vs cold starts of each retrain
        self._cache: dict[str, GateDecision] = {}  # decisions already taken, by version
        self.requested: tuple[int, int] | None = None  # (drift start ts, events scored at the request)
        self.t0 = time.time()

    def _log(self, what: str, **fields: Any) -> None:
        """One deployment decision, stamped with event time and wall-clock seconds since the run began."""
        self.events.append(
            {
                "what": what,
                "ts": self.live.last_ts,
                "wall_s": round(time.time() - self.t0, 2),
                "at_event": self.live.scored,
                **fields,
            }
        )

    # -- the gate -----------------------------------------------------------------------------------
    def gate(self, version: str, kind: str) -> GateDecision:
        """Paired test of ``version`` against the served model on the newest events neither learned from.

        Raises :class:`DeployError` when too few such events exist yet (the caller waits, or declines)."""
        # torch lives behind these: jobs.monitor imports this module, which loads in 0.2 s without torch (3 s with)

        served = self.live.served
        if served is None:
            raise DeployError("no version is serving: nothing to compare with")
        cand = load_bundle(self.registry, version, self.cfg.memory)
        horizon = horizon_of(cand.entry)
        a = self.live.trace.arrays()
        # only from the served version's first row on: the whole trace (a million rows at 1M events) is O(N) a gate
        start = self.live.trace.first_rows.get(served.version, len(a["version"]))
        ok = a["version"][start:] == served.version
        if horizon is not None:
            ok &= a["ts"][start:] > horizon
        idx = np.flatnonzero(ok) + start
        recent = self.live.recent()
        if recent is None:
            raise DeployError("no recent rows buffered")
        # each event's row in the buffer (its last, if buffered twice), in C: a Python dict of the whole buffer
        # and a loop over the trace took ~45 ms of every gate
        n = recent.num_rows
        backwards = recent["event_id"].combine_chunks().take(pa.array(np.arange(n - 1, -1, -1)))
        found = pc.index_in(pa.array(a["event_id"][idx], pa.string()), value_set=backwards).fill_null(n)
        where = n - 1 - found.to_numpy().astype(np.int64)
        keep = where >= 0
        idx, where = idx[keep][-self.cfg.gate_events :], where[keep][-self.cfg.gate_events :]
        if len(idx) < self.cfg.gate_min_events:
            raise DeployError(
                f"only {len(idx)} events served by {served.version} after {version}'s horizon "
                f"(need {self.cfg.gate_min_events})"
            )
        rows = recent.take(pa.array(where))
        p_cand = predict_table(cand.model, cand.encoder, rows).astype(np.float64)  # the base model, no memory
        try:
            d = paired_test(
                a["y"][idx],
                p_cand,
                a["p_base"][idx],
                kind,
                level=self.cfg.gate_level,
                block=self.cfg.gate_block,
                min_n=self.cfg.gate_min_events,
                seed=self.cfg.seed,
                margin=self.cfg.gate_margin,
            )
        except GateError as e:
            raise DeployError(str(e)) from e
        rec = {
            "version": version,
            "current": served.version,
            "horizon_ts": horizon,
            "events_ts": [int(a["ts"][idx].min()), int(a["ts"][idx].max())],
            **d.to_dict(),
        }
        self.decisions.append(rec)
        self._log(
            "gate",
            **{
                k: rec[k]
                for k in (
                    "kind",
                    "version",
                    "current",
                    "promote",
                    "n",
                    "diff",
                    "lo",
                    "hi",
                    "candidate_logloss",
                    "current_logloss",
                )
            },
        )
        return d

    # -- Actions protocol ---------------------------------------------------------------------------
    def request_retrain(self, request) -> None:
        """Note the request; :meth:`tick` starts the retrain once enough post-drift data has arrived."""
        if self.pending is not None or self.requested is not None or self.ready:
            self._log("retrain already requested")  # one at a time
            return None
        if self.live.scored < self.backoff_until:
            self._log(
                "retrain deferred",
                why=f"{self.rejected_in_a_row} rejected retrain(s) in a row: no new "
                f"retrain before event {self.backoff_until:,}",
            )
            return None
        # where the new concept began: detectors report when they fired, not where the change was, so take
        # the event `retrain_lookback` events before the request (about one detection delay)
        ts = self.live.trace.last(self.cfg.retrain_lookback + 1)["ts"]
        self.requested = (int(ts[0]) if len(ts) else self.live.last_ts, self.live.scored)
        self._log("retrain requested", drift_from_ts=self.requested[0])
        return None  # asynchronous: tick() hands the candidate to the monitor loop when it is done

    def evaluate_candidate(self, candidate: Candidate, current_version: str | None) -> Evaluation:
        d = self._cache.pop(candidate.version, None) or self.gate(candidate.version, candidate.kind)
        return Evaluation(
            d.promote,
            {"logloss": d.candidate_logloss, "n": d.n, "diff": d.diff, "lo": d.lo, "hi": d.hi},
            {"logloss": d.current_logloss, "n": d.n},
            d.summary(),
            d.to_dict(),
        )

    def promote(self, candidate: Candidate) -> str:
        self.registry.promote(candidate.version, reason=f"{candidate.kind}: passed the gate")
        return candidate.version

    def rollback(self, to_version: str | None, from_version: str | None) -> str:
        """Roll back to the version served before the current one, if the gate finds evidence it is better."""
        served = self.live.served
        previous = next((v["version"] for v in reversed(self.live.versions[:-1])), None) or to_version
        if served is None or previous is None:
            self._log("rollback declined", why="no previous version")
            return served.version if served else ""
        try:
            d = self.gate(previous, "rollback")
        except DeployError as e:
            self._log("rollback declined", why=str(e))
            return served.version
        if not d.promote:
            self._log("rollback declined", why=d.summary())
            return served.version
        self.rollbacks += 1
        self.registry.promote(previous, reason=f"rollback from {served.version}: {d.summary()}")
        return previous

    # -- periodic work ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Bootstrap the first version, gate the trainer's newest checkpoint, start and finish retrains."""
        self._retrain_tick()
        if self.ready:
            return
        trainer_versions = [
            v
            for v in self.registry.versions(skip=self.considered)
            if self.registry.entry(v).extra.get("source") == "jobs.trainer"
        ]
        if trainer_versions:
            self.considered.update(trainer_versions)
            if self.registry.current() is None:
                self.registry.promote(trainer_versions[-1], reason="bootstrap: first incremental checkpoint")
                return
            if self.cfg.refresh:
                if self.offered is not None:
                    self._log("refresh superseded", version=self.offered, by=trainer_versions[-1])
                self.offered = trainer_versions[-1]
        if self.offered is None or self.live.served is None or self.live.waiting is not None:
            return
        version = self.offered
        # a checkpoint of the lineage that serves is a routine refresh (the trainer's own, or one that took
        # over a promoted retrain's weights); replacing another lineage needs the evidence a retrain needs
        served = self.live.served
        served_source = (served.entry.extra or {}).get("source") if served.entry else None
        adopted = (self.registry.entry(version).extra or {}).get("adopted")
        kind = "refresh" if served_source == "jobs.trainer" or adopted == served.version else "retrain"
        try:
            d = self.gate(version, kind)
        except DeployError:
            return  # not enough events after its horizon yet: ask again next tick
        self.offered = None
        if d.promote:
            self.registry.promote(version, reason=f"refresh: {d.summary()}")
        else:
            self._log("refresh rejected", version=version, why=d.summary())

    def flush(self) -> None:
        """At the end of the stream: candidates still waiting for gate events are not decided (said so)."""
        self.tick()
        for c in self.ready:
            self._log("retrain candidate not decided: the stream ended first", version=c.version)
        self.ready = []
        if self.offered is not None:
            self._log("refresh not decided: the stream ended first", version=self.offered)
            self.offered = None

    def _retrain_tick(self) -> None:
        if self.requested is not None:
            drift_ts, scored_at = self.requested
            need = self.cfg.retrain_min_rows + self.cfg.holdout
            post = int((self.live.trace.arrays()["ts"] >= drift_ts).sum()) if self.live.scored else 0
            if post >= need or self.live.scored - scored_at >= need:
                self.requested = None
                try:
                    ts_min, ts_max = self._window(drift_ts)
                except DeployError as e:
                    self._log("retrain skipped", why=str(e))
                else:
                    self._log("retrain submitted", window_ts_min=ts_min, window_ts_max=ts_max)
                    self.pending = self.pool.submit(self._retrain, ts_min, ts_max)
                    self.retrains += 1
        if self.pending is not None and self.pending.done():
            fut, self.pending = self.pending, None
            try:
                cands = fut.result()
            except Exception as e:  # noqa: BLE001 - a failed retrain keeps the current model
                self._log("retrain failed", error=repr(e))
            else:
                self.considered.update(c.version for c in cands)
                self.ready = cands
        if self.ready:
            # the gate needs enough events served by the current version after the candidates' horizon; until
            # then they wait (and routine refreshes are held, so the current version stays put meanwhile)
            try:
                cand = self._choose(self.ready)
            except DeployError:
                return
            self.ready = []
            promoted = self.monitor.on_candidate(cand) if self.monitor is not None else False
            if promoted and self.on_promoted is not None:
                try:
                    self.on_promoted(cand.version)
                except Exception as e:  # noqa: BLE001 - the trainer goes on from its own weights
                    self._log("trainer did not adopt the promoted retrain", error=repr(e))
            self.rejected_in_a_row = 0 if promoted else self.rejected_in_a_row + 1
            if not promoted:
                self.backoff_until = self.live.scored + self.cfg.retrain_backoff * 2 ** (self.rejected_in_a_row - 1)
            self._log(
                "retrain candidate " + ("promoted" if promoted else "rejected"),
                version=cand.version,
                start=cand.start,
                **cand.metrics,
            )

    def _choose(self, cands: list[Candidate]) -> Candidate:
        """Of several retrain candidates (warm and cold starts of one window), the one to hand to the monitor:
        the gate judges each on the same events; the lowest logloss among those that pass wins (else the
        lowest logloss, which the monitor's gate will then reject). Each comparison is logged."""
        scored = []
        for c in cands:
            d = self._cache.get(c.version) or self.gate(c.version, c.kind)  # DeployError: wait for events
            self._cache[c.version] = d
            scored.append((not d.promote, d.candidate_logloss, c))
        if len(cands) == 1:
            return cands[0]
        scored.sort(key=lambda x: (x[0], x[1]))
        best = scored[0][2]
        self.retrain_comparisons.append(
            {
                "at_event": self.live.scored,
                "ts": self.live.last_ts,
                "chosen": best.version,
                "candidates": [
                    {"version": c.version, "start": c.start, "passes": not bad, "logloss": round(ll, 6)}
                    for bad, ll, c in scored
                ],
            }
        )
        return best

    def start_retrain_worker(self) -> None:
        """Start the long-lived retrain worker now (Ray initialised), so that its start-up (a process that
        imports torch, 10-20 s on 2 cores) overlaps the stream instead of holding it at the first drift.
        Only for single-worker retrains: DDP retrains (``retrain_workers`` > 1) use Ray Train's worker group."""
        if self.cfg.retrain_workers == 1 and self.retrain_worker is None:
            import ray  # Ray is initialised by the run before this is called

            self.retrain_worker = ray.remote(num_cpus=1)(RetrainWorker).remote()

    def close(self, wait: bool = True) -> None:
        """Wait for a running retrain (or, when interrupted, drop it: its candidate was never gated)."""
        self.pool.shutdown(wait=wait, cancel_futures=not wait)

    # -- retrains -----------------------------------------------------------------------------------
    def _window(self, drift_ts: int) -> tuple[int, int]:
        """``[ts_min, ts_max)`` of the retrain: from where the drift began (at least ``retrain_min_rows``
        and at most ``retrain_window`` examples) up to the gate's holdout, which it never sees."""

        last = self.live.trace.last(self.cfg.holdout)
        if len(last["ts"]) == 0:
            raise DeployError("nothing scored yet: no holdout to keep out of the retrain window")
        ts_max = int(last["ts"].min())
        ts = np.sort(ExampleStore(self.cfg.examples_uri, columns=["ts"]).read_window(None, ts_max)["ts"].to_numpy())
        if len(ts) == 0:
            raise DeployError("no examples before the holdout to retrain on")
        since = int(np.searchsorted(ts, drift_ts))
        first = min(since, max(0, len(ts) - self.cfg.retrain_min_rows))
        first = max(first, len(ts) - self.cfg.retrain_window)
        return int(ts[first]), ts_max

    def _retrain(self, ts_min: int, ts_max: int) -> list[Candidate]:
        """Ray Train ``TorchTrainer`` on the window (jobs.retrain): a cold fit, a warm start from the served
        model with a replay sample, or both; each published as a candidate version."""

        served = self.live.served.version if self.live.served is not None else None
        starts = list(dict.fromkeys({"cold": [None], "warm": [served], "both": [served, None]}[self.cfg.retrain_start]))
        # one Ray Train fit for all the starts: its worker group's start-up is most of a retrain's time
        fitted = run_retrains(
            RetrainConfig(
                examples_uri=self.cfg.examples_uri,
                registry_uri=self.cfg.registry_uri,
                storage_path=self.cfg.ray_train_uri or str(Path(self.cfg.work_dir) / "ray_train"),
                model_kind=self.cfg.model,
                hash_buckets=self.cfg.hash_buckets,
                architecture=self.cfg.architecture,
                window_days=None,
                ts_min=ts_min,
                ts_max=ts_max,
                seed=self.cfg.seed,
                replay_ratio=self.cfg.replay_ratio,  # for the warm start only
                num_workers=self.cfg.retrain_workers,
                placement_strategy=self.cfg.retrain_placement,
                side_tables_uri=self.cfg.side_tables_uri,
            ),
            starts,
            worker=self.retrain_worker,
        )
        out = []
        for res in fitted:
            self._log("retrain fitted", version=res["version"], worker_nodes=res.get("worker_nodes", []))
            out.append(
                Candidate(
                    res["version"],
                    None,
                    {**res["metrics"], "fit_seconds": res["fit_seconds"]},
                    "retrain",
                    res["start"],
                )
            )
        return out
