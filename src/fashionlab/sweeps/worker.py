"""A worker: claims trials until the design is done, trains each (point, seed), keeps its heartbeat.

Should a key ever be queued or claimed twice (a starter killed half-way through enqueueing, a
race), the later trial closes itself as PRUNED with `duplicate_of`, so no key is trained or
counted twice.

Fault tolerance. A running trial records a heartbeat every `heartbeat_interval` seconds; any
worker that finds one older than `grace_period` marks it FAIL and re-queues it
(optuna's RetryHeartbeatStaleTrialCallback), so a killed worker's point is redone by another. A
run folder with a checkpoint is resumed; one with metrics.json is reused, never trained again.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import run as run_mod, tracking
from ..atomic import OutputError
from .design import Point, point_id, trial_attrs, trial_config, trial_key
from .progress import Tally, tally
from .spec import Spec, SpecError
from .storage import open_study

MAX_TPE_DUPLICATES = 50  # consecutive repeats of tried points before TPE is considered exhausted


class _Heartbeat:
    """Records the trial's heartbeat every interval until stopped (the stale-trial detector reads it)."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:
                pass  # a transient database error; the grace period covers a missed beat

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Worker:
    """One worker: claims trials until the design is done; run it on as many processes and machines as you like."""

    spec: Spec
    storage: Any
    log: Callable[[str], None] = lambda m: None  # trial starts; failures always go to stderr
    poll_s: float = 1.0
    ident: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    trained: int = 0
    reused: int = 0
    tracking: Any = None  # tracking.Tracking: the experiment trackers each trial's run is logged to
    _dataset: Any = None

    def run(self) -> Tally:
        import optuna
        self.study = open_study(self.spec, self.storage)
        # The study's own (caching) view of the storage: trials claimed here must be known to it.
        self.store = self.study._storage
        self.study_id = self.study._study_id
        duplicates = 0
        rechecked = False
        while True:
            optuna.storages.fail_stale_trials(self.study)
            trial_id = self._claim_waiting()
            if trial_id is None:
                t = self._tally()
                if self.spec.sampler == "tpe" and duplicates < MAX_TPE_DUPLICATES \
                        and t.points_tried < min(self.spec.n_points, self.spec.grid_size):
                    trial_id = self.study.ask()._trial_id
                elif (t.finished or (t.running == 0 and t.waiting == 0)) and t.failed and not rechecked:
                    # Another worker may have just failed a stale trial and be queueing its retry
                    # (two separate writes): look once more before calling the failure final.
                    rechecked = True
                    time.sleep(self.poll_s)
                    continue
                elif t.finished or (t.running == 0 and t.waiting == 0):
                    return t
                else:
                    time.sleep(self.poll_s)  # others are running; stay to redo their points should they die
                    continue
            rechecked = False
            outcome = self._run_trial(trial_id)
            duplicates = duplicates + 1 if outcome == "duplicate" else 0

    def _tally(self) -> Tally:
        return tally(self.spec, self.store.get_all_trials(self.study_id, deepcopy=False))

    def _claim_waiting(self) -> int | None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState
        for t in self.store.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if self.store.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return t._trial_id
            except UpdateFinishedTrialError:
                continue
        return None

    def _run_trial(self, trial_id: int) -> str:
        import optuna
        from optuna.trial import TrialState
        from ..training import TrainingInterrupted
        with _Heartbeat(self.store, trial_id, self.store.get_heartbeat_interval()):
            trial = optuna.Trial(self.study, trial_id)
            attrs = trial.user_attrs
            fresh = "key" not in attrs  # a TPE proposal: its factors come from the sampler
            point = {f.name: trial.suggest_categorical(f.name, f.labels) for f in self.spec.factors}
            seed = attrs.get("seed", self.spec.seeds[0])
            if fresh:
                for k, v in trial_attrs(point, seed).items():
                    trial.set_user_attr(k, v)
            key = trial_key(point, seed)
            trial.set_user_attr("worker", self.ident)
            reason, other = self._redundant(trial.number, key, point_id(point), fresh)
            if reason:
                trial.set_user_attr("duplicate_of" if reason == "duplicate" else "over_budget", other)
                self.study.tell(trial, state=TrialState.PRUNED)
                return reason
            if fresh:
                self._enqueue_other_seeds(point, seed)
            run_dir = self.spec.folder / "runs" / key
            self.log(f"{self.ident}: trial {trial.number} {key}")
            try:
                metrics, reused = run_point(self.spec, point, seed, run_dir, self._get_dataset, self.tracking,
                                            wait=lambda line: print(f"\n{self.ident}: trial {trial.number}: {line}",
                                                                    file=sys.stderr, flush=True))
            except TrainingInterrupted:
                self.study.tell(trial, state=TrialState.FAIL)
                self._requeue(trial_id)  # an interruption by the user is no failure: queue it again
                raise
            except Exception as e:
                if isinstance(e, OutputError) and e.disk_full:
                    # Not the point's failure, and every next trial would meet the same disk: queue it again
                    # (first, so that a storage on the same full disk leaves it running, to be retried once
                    # its heartbeat is stale) and stop this worker with the one line.
                    self._requeue(trial_id)
                    self.study.tell(trial, state=TrialState.FAIL)
                    raise e.with_note("the trial is queued again: run the same sweep command to continue") from None
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                print(f"\n{self.ident}: trial {trial.number} ({key}) failed: {type(e).__name__}: {e}", file=sys.stderr)
                self.study.tell(trial, state=TrialState.FAIL)
                callback = getattr(self.store, "get_heartbeat_stale_trial_callback", None) \
                    or self.store.get_failed_trial_callback
                callback = callback()
                if callback:
                    callback(self.study, self.store.get_trial(trial_id))
                return "failed"
            self.reused += reused
            self.trained += not reused
            trial.set_user_attr("metrics", {k: metrics.get(k) for k in (
                "test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_seconds", "wall_seconds",
                "params", "epochs_run")})
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("reused_run", bool(reused))
            # A last guard against a race the claim-time check cannot see: never complete a key twice.
            other = self._complete_elsewhere(key, trial.number)
            if other is not None:
                trial.set_user_attr("duplicate_of", other)
                self.study.tell(trial, state=TrialState.PRUNED)
                return "duplicate"
            self.study.tell(trial, metrics[self.spec.metric])
            return "reused" if reused else "trained"

    def _redundant(self, number: int, key: str, pid: str, fresh: bool) -> tuple[str | None, int | None]:
        """('duplicate', n) when trial n already holds this key; ('over_budget', None) for a TPE point too many."""
        from optuna.trial import TrialState
        if fresh:
            self._wait_for_earlier_keys(number)
        trials = self.store.get_all_trials(self.study_id, deepcopy=False)
        live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        for t in trials:
            if t.number == number or t.user_attrs.get("key") != key:
                continue
            if t.state == TrialState.COMPLETE or (t.state in live and t.number < number):
                return "duplicate", t.number
        if fresh:
            earlier = {t.user_attrs.get("point") for t in trials if t.number < number
                       and t.state != TrialState.PRUNED and t.user_attrs.get("point")}
            if pid in earlier:
                return "duplicate", None
            if len(earlier) >= self.spec.n_points:
                return "over_budget", None
        return None, None

    def _wait_for_earlier_keys(self, number: int, timeout: float = 10.0) -> None:
        # A TPE trial proposed just before this one may not have written its key yet.
        from optuna.trial import TrialState
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [t for t in self.store.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,))
                       if t.number < number and "key" not in t.user_attrs]
            if not pending:
                return
            time.sleep(0.2)

    def _complete_elsewhere(self, key: str, number: int) -> int | None:
        from optuna.trial import TrialState
        for t in self.store.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("key") == key and t.number != number:
                return t.number
        return None

    def _enqueue_other_seeds(self, point: Point, first_seed: int) -> None:
        existing = {t.user_attrs.get("key") for t in self.store.get_all_trials(self.study_id, deepcopy=False)}
        for seed in self.spec.seeds:
            if seed != first_seed and trial_key(point, seed) not in existing:
                self.study.enqueue_trial(point, user_attrs=trial_attrs(point, seed))

    def _requeue(self, trial_id: int) -> None:
        import optuna
        old = self.store.get_trial(trial_id)
        self.study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.WAITING, params=old.params, distributions=old.distributions,
            user_attrs={k: v for k, v in old.user_attrs.items() if k in ("key", "point", "seed")},
            system_attrs=old.system_attrs))

    def _get_dataset(self):
        if self._dataset is None:
            from .. import data
            self._dataset = data.load(data.spec_for(class_names=self.spec.class_names), data_dir=self.spec.data_dir)
        return self._dataset


def run_point(spec: Spec, point: Point, seed: int, run_dir: Path, get_dataset,
              tracks=None, wait: Callable[[str], None] | None = None) -> tuple[dict[str, Any], bool]:
    """Train one (point, seed) into run_dir; returns (metrics with the last validation scores, reused).
    Finished runs are reused, interrupted ones resumed (run.train_or_reuse); `tracks` (tracking.Tracking)
    logs the run, a reused one from its files. A run folder another process is writing (a worker
    thought lost that is still training) is waited for, said through `wait`, and then reused: the
    trial's heartbeat goes on meanwhile, so it is not queued again."""
    with (tracks or tracking.Tracking()).run(run_dir) as trackers:
        folder, action = run_mod.train_or_reuse(trial_config(spec, point, seed), run_dir, get_dataset, trackers,
                                                wait=wait)
    return {**folder.metrics, **folder.validation_scores()}, action == "reused"
