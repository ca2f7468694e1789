"""Admission: admit, queue or reject a new session by predicted feasibility, not a session count.

A session is admitted when the predicted load with it stays under `max_utilization` and its own
first chunk can arrive within its TTFF SLO. Otherwise, if sessions that allow it can drop steps
(4 -> 2 -> 1) to make room, they do (`degrade` in the decision). Otherwise it is queued when a
slot is predicted to free up within `max_queue_wait_s` (sessions with a known duration end), or
rejected: `slo_infeasible` when it could not meet its SLO even on an idle executor,
`capacity_exhausted` otherwise, with a retry-after estimate.

Pipeline parallelism: an executor of S stages holds S micro-batches at once, so the sessions
together may use S times one forward's worth of time per second (`parallelism`); one session on
its own gets no such help (its next forward waits for its last), so its own feasibility is judged
without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from rollcast.scheduler.capacity import LoadSpec, first_chunk_seconds, load
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.session import SessionRecord

Outcome = Literal["admitted", "queued", "rejected"]


@dataclass(frozen=True)
class AdmissionConfig:
    max_utilization: float = 0.9
    max_queue: int = 16
    max_queue_wait_s: float = 10.0
    default_retry_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.max_utilization <= 1:
            raise ValueError(f"max_utilization must lie in (0, 1], got {self.max_utilization}")
        if self.max_queue < 0 or self.max_queue_wait_s < 0:
            raise ValueError("max_queue and max_queue_wait_s must be >= 0")


@dataclass(frozen=True)
class AdmissionDecision:
    outcome: Outcome
    # "capacity_exhausted" | "slo_infeasible"; "unsupported" when the executor refused to open it
    reason: str | None = None
    queue_position: int | None = None
    estimated_wait_s: float | None = None
    retry_after_s: float | None = None
    degrade: tuple[tuple[str, int], ...] = field(default_factory=tuple)  # (session_id, steps)
    predicted_load: float = 0.0
    detail: str | None = None  # the executor's message when it refused the session


def step_levels(steps: int, min_steps: int | None) -> list[int]:
    """The step counts a session may run at, best first: 4 -> 2 -> 1 (halving), not below min."""
    levels = [steps]
    floor = steps if min_steps is None else min_steps
    while levels[-1] > floor:
        levels.append(max(floor, levels[-1] // 2))
    return levels


def spec_of(rec: SessionRecord, steps: int | None = None) -> LoadSpec:
    return LoadSpec(rec.geometry, steps if steps is not None else (rec.steps or rec.request.steps),
                    rec.fps or rec.slo.fps, rec.lanes)


class AdmissionController:
    def __init__(self, config: AdmissionConfig, cost: CostModel, max_batch: int) -> None:
        self.config = config
        self.cost = cost
        self.max_batch = max_batch
        self.parallelism = 1  # micro-batches the executor runs at once (pipeline stages)

    def load(self, specs: Sequence[LoadSpec]) -> float:
        """The executor's predicted utilisation with these sessions (1.0: never idle)."""
        return load(specs, self.cost, self.max_batch) / self.parallelism

    def decide(self, new: SessionRecord, active: Sequence[SessionRecord], *, now: float,
               queue_len: int, allow_queue: bool = True, allow_degrade: bool = True) -> AdmissionDecision:
        cfg = self.config
        own = spec_of(new, steps=step_levels(new.request.steps, new.slo.min_steps)[-1])
        alone = load([own], self.cost, self.max_batch)
        if alone > cfg.max_utilization or first_chunk_seconds(own, self.cost, 1) > new.slo.ttff_s:
            return AdmissionDecision("rejected", "slo_infeasible", predicted_load=alone)
        current = {r.session_id: spec_of(r) for r in active}
        full = self.load([*current.values(), spec_of(new)])
        sharing = min(len(active) + 1, self.max_batch)
        ttff_ok = first_chunk_seconds(spec_of(new), self.cost, sharing) <= new.slo.ttff_s
        if full <= cfg.max_utilization and ttff_ok:
            return AdmissionDecision("admitted", predicted_load=full)
        degrade = self._degradation_plan(new, active, current) if allow_degrade else None
        if degrade is not None:
            plan, predicted = degrade
            return AdmissionDecision("admitted", degrade=tuple(plan), predicted_load=predicted)
        wait = self._wait_for_room(new, active, now)
        if allow_queue and queue_len < cfg.max_queue and wait <= cfg.max_queue_wait_s:
            return AdmissionDecision("queued", "capacity_exhausted", queue_position=queue_len + 1,
                                     estimated_wait_s=wait, predicted_load=full)
        retry = wait if math.isfinite(wait) else cfg.default_retry_after_s
        return AdmissionDecision("rejected", "capacity_exhausted", retry_after_s=retry,
                                 estimated_wait_s=wait if math.isfinite(wait) else None,
                                 predicted_load=full)

    def _degradation_plan(self, new: SessionRecord, active: Sequence[SessionRecord],
                          current: dict[str, LoadSpec]) -> tuple[list[tuple[str, int]], float] | None:
        """Lower the steps of willing sessions (the new one included), largest saving first, until
        the load fits; None when even everyone at their floor does not fit."""
        recs = {r.session_id: r for r in [*active, new]}
        steps = {sid: spec_of(r).steps for sid, r in recs.items()}

        def total() -> float:
            return self.load([spec_of(recs[sid], steps[sid]) for sid in recs])

        changes: dict[str, int] = {}
        predicted = total()
        while predicted > self.config.max_utilization:
            best: tuple[float, str, int] | None = None
            for sid, rec in recs.items():
                if rec.lanes > 1:
                    continue
                levels = step_levels(rec.request.steps, rec.slo.min_steps)
                lower = [lv for lv in levels if lv < steps[sid]]
                if not lower:
                    continue
                before = steps[sid]
                steps[sid] = lower[0]
                saving = predicted - total()
                steps[sid] = before
                if best is None or saving > best[0]:
                    best = (saving, sid, lower[0])
            if best is None:
                return None
            _, sid, lv = best
            steps[sid] = changes[sid] = lv
            predicted = total()
        return list(changes.items()), predicted

    def _wait_for_room(self, new: SessionRecord, active: Sequence[SessionRecord], now: float) -> float:
        """Seconds until enough sessions with a known end have ended for `new` to fit."""
        ends = []
        for r in active:
            if r.request.duration_s is None or r.t_admitted is None:
                continue
            ends.append((r.t_admitted + r.slo.ttff_s + r.request.duration_s, r.session_id))
        ends.sort()
        remaining = {r.session_id: spec_of(r) for r in active}
        for t_end, sid in ends:
            remaining.pop(sid)
            if self.load([*remaining.values(), spec_of(new)]) <= self.config.max_utilization:
                return max(0.0, t_end - now)
        return math.inf
