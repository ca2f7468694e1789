"""Degradation and recovery of running sessions under changing load.

When the predicted load exceeds `high_utilization`, or deadlines were missed since the last look,
one willing session steps down one level: fewer denoising steps (4 -> 2 -> 1, not below its
`min_steps`), then a lower frame rate (its `min_fps`). When load falls so that restoring one level
keeps the load under `low_utilization`, the session degraded the longest recovers one level.
At most one change per `min_interval_s`, and the gap between the thresholds, keep it from
flapping. Each change is returned for the engine to apply and announce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rollcast.scheduler.admission import spec_of, step_levels
from rollcast.scheduler.capacity import LoadSpec
from rollcast.scheduler.session import SessionRecord


@dataclass(frozen=True)
class DegradationConfig:
    high_utilization: float = 0.95
    low_utilization: float = 0.75
    min_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.low_utilization < self.high_utilization:
            raise ValueError("need 0 < low_utilization < high_utilization")


@dataclass(frozen=True)
class Change:
    session_id: str
    kind: str  # "steps" | "fps"
    old: float
    new: float
    direction: str  # "degraded" | "recovered"


def _lower(rec: SessionRecord) -> Change | None:
    levels = step_levels(rec.request.steps, rec.slo.min_steps)
    current = rec.pending_steps or rec.steps
    lower = [lv for lv in levels if lv < current]
    if lower and rec.lanes == 1:
        return Change(rec.session_id, "steps", current, lower[0], "degraded")
    if rec.slo.min_fps is not None and rec.fps > rec.slo.min_fps:
        return Change(rec.session_id, "fps", rec.fps, rec.slo.min_fps, "degraded")
    return None


def _raise(rec: SessionRecord) -> Change | None:
    if rec.fps < rec.slo.fps:
        return Change(rec.session_id, "fps", rec.fps, rec.slo.fps, "recovered")
    current = rec.pending_steps or rec.steps
    higher = [lv for lv in step_levels(rec.request.steps, rec.slo.min_steps) if lv > current]
    if higher:
        return Change(rec.session_id, "steps", current, higher[-1], "recovered")
    return None


def _spec_after(rec: SessionRecord, change: Change) -> LoadSpec:
    spec = spec_of(rec, steps=rec.pending_steps or rec.steps)
    if change.kind == "steps":
        return LoadSpec(spec.geometry, int(change.new), spec.fps, spec.lanes)
    return LoadSpec(spec.geometry, spec.steps, change.new, spec.lanes)


class DegradationController:
    def __init__(self, config: DegradationConfig | None = None) -> None:
        self.config = config or DegradationConfig()
        self._last_change = -float("inf")
        self._degraded_at: dict[str, float] = {}

    def step(self, now: float, active: Sequence[SessionRecord], misses: int,
             load: Callable[[list[LoadSpec]], float]) -> Change | None:
        cfg = self.config
        if now - self._last_change < cfg.min_interval_s or not active:
            return None
        specs = {r.session_id: spec_of(r, steps=r.pending_steps or r.steps) for r in active}
        current = load(list(specs.values()))
        if current > cfg.high_utilization or misses > 0:
            change = self._best_degradation(active, specs, load)
            if change is not None:
                self._degraded_at.setdefault(change.session_id, now)
        else:
            change = self._recovery(active, specs, load)
        if change is not None:
            self._last_change = now
        return change

    def _best_degradation(self, active: Sequence[SessionRecord], specs: dict[str, LoadSpec],
                          load: Callable[[list[LoadSpec]], float]) -> Change | None:
        best: tuple[float, Change] | None = None
        for rec in active:
            change = _lower(rec)
            if change is None:
                continue
            trial = {**specs, rec.session_id: _spec_after(rec, change)}
            after = load(list(trial.values()))
            if best is None or after < best[0]:
                best = (after, change)
        return best[1] if best else None

    def _recovery(self, active: Sequence[SessionRecord], specs: dict[str, LoadSpec],
                  load: Callable[[list[LoadSpec]], float]) -> Change | None:
        for sid in sorted(self._degraded_at, key=self._degraded_at.__getitem__):
            rec = _find(active, sid)
            if rec is None:
                self._degraded_at.pop(sid)
                continue
            change = _raise(rec)
            if change is None:
                continue
            trial = {**specs, sid: _spec_after(rec, change)}
            if load(list(trial.values())) <= self.config.low_utilization:
                return change
            return None  # the oldest first: nobody jumps the line
        return None

    def applied(self, rec: SessionRecord) -> None:
        """After a change was applied: a fully recovered (or gone) session leaves the line."""
        if rec.state != "active" or _raise(rec) is None:
            self._degraded_at.pop(rec.session_id, None)

    def note_degraded(self, session_id: str, now: float) -> None:
        """Sessions degraded by admission recover through the same path."""
        self._degraded_at.setdefault(session_id, now)


def _find(active: Sequence[SessionRecord], sid: str) -> SessionRecord | None:
    return next((r for r in active if r.session_id == sid), None)
