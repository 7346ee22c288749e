"""Where a sweep stands: the tally of its trials by key, and the live progress line."""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass

from .design import describe_point
from .spec import Spec


@dataclass
class Tally:
    total: int
    done: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0  # keys whose every attempt failed and that are not queued again
    points_tried: int = 0
    best: tuple[str, float, float, int] | None = None  # (point, mean, std, seeds)

    @property
    def finished(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.done + self.failed >= self.total

    def line(self, spec: Spec) -> str:
        s = f"{spec.name}: {self.done}/{self.total} done, {self.running} running, {self.failed} failed"
        if self.best:
            point, mean, std, n = self.best
            s += f" | best {spec.metric} {mean:.4f} ± {std:.4f} (n={n}) at {point}"
        return s


def tally(spec: Spec, trials) -> Tally:
    from optuna.trial import TrialState
    t = Tally(total=spec.total_trials)
    by_key: dict[str, list] = {}
    for tr in trials:
        if tr.state == TrialState.RUNNING:
            t.running += 1
        elif tr.state == TrialState.WAITING:
            t.waiting += 1
        key = tr.user_attrs.get("key")
        if key:
            by_key.setdefault(key, []).append(tr)
    values: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    points = set()
    for key, group in by_key.items():
        states = {tr.state for tr in group}
        if states != {TrialState.PRUNED}:
            points.add(group[0].user_attrs["point"])
        complete = [tr for tr in group if tr.state == TrialState.COMPLETE]
        if complete:
            t.done += 1
            pid = complete[0].user_attrs["point"]
            values.setdefault(pid, []).append(complete[0].value)
            labels[pid] = describe_point({f.name: complete[0].params.get(f.name) for f in spec.factors})
        elif TrialState.FAIL in states and not states & {TrialState.RUNNING, TrialState.WAITING}:
            t.failed += 1
    t.points_tried = len(points)
    if values:
        sign = 1 if spec.direction == "maximize" else -1
        pid = max(values, key=lambda p: sign * _mean(values[p]))
        v = values[pid]
        t.best = (labels[pid], _mean(v), _std(v), len(v))
    return t


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _std(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


class ProgressLine:
    """Prints the live progress line: rewritten in place on a terminal, one line per change otherwise."""

    def __init__(self, spec: Spec, storage, every: float = 2.0, stream=None):
        self.spec, self.storage, self.every = spec, storage, every
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last = ""

    def current(self) -> Tally:
        study_id = self.storage.get_study_id_from_name(self.spec.name)
        return tally(self.spec, self.storage.get_all_trials(study_id, deepcopy=False))

    def show(self, final: bool = False) -> Tally:
        t = self.current()
        line = t.line(self.spec)
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif line != self._last or final:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line
        return t

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.show()
            except Exception:  # a busy database must not kill the sweep; the next tick retries
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
