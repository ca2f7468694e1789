"""Batching policies: which ready forwards run together next.

- `slo`: least slack first; the micro-batch takes the most urgent forward and grows with
  same-shape forwards, most urgent first, only while no forward that could still meet its deadline
  (in the batch or waiting) would miss it because the batch got longer. With admission control and
  degradation (`slo`), or without either gate on load (`slo-noadmit`).
- `fifo`: StreamDiffusionV2's scheme: a fixed stream batch of one session's consecutive blocks at
  its `steps` noise levels (one lane per step), sessions served in the order their work became
  ready, never batched with each other; no admission control.
- `rr`: round-robin over sessions, batching every ready same-shape forward up to the batch limit,
  blind to deadlines; no admission control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rollcast.scheduler.capacity import decode_seconds
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.session import SessionRecord, SessionRequest
from rollcast.scheduler.work import BatchShape, MicroBatch, WorkItem

POLICY_NAMES = ("slo", "slo-noadmit", "fifo", "rr")


class Policy(Protocol):
    name: str
    admission: bool  # gate new sessions on predicted feasibility
    degradation: bool  # lower steps/fps of willing sessions under overload

    def lanes(self, request: SessionRequest) -> int: ...

    def next_batch(self, now: float, sessions: Sequence[SessionRecord], cost: CostModel,
                   max_batch: int) -> MicroBatch | None: ...


@dataclass
class _Candidate:
    item: WorkItem
    remaining_s: float  # predicted work left for its block, this forward included, one at a time
    t1: float  # predicted time of its forward alone

    @property
    def slack(self) -> float:
        return self.item.deadline - self.remaining_s  # minus `now` later: order is the same


def _candidates(sessions: Sequence[SessionRecord], cost: CostModel) -> list[_Candidate]:
    out = []
    single: dict[object, float] = {}
    for rec in sessions:
        for item in rec.ready_items():
            t1 = single.get(item.shape)
            if t1 is None:
                t1 = single[item.shape] = cost.predict(BatchShape(1, item.shape))
            dec = decode_seconds(rec.geometry, cost)
            out.append(_Candidate(item, rec.remaining_s(item, t1, dec), t1))
    return out


class SLOBatching:
    def __init__(self, *, admission: bool = True, degradation: bool = True) -> None:
        self.name = "slo" if admission else "slo-noadmit"
        self.admission = admission
        self.degradation = degradation

    def lanes(self, request: SessionRequest) -> int:
        return 1

    def next_batch(self, now: float, sessions: Sequence[SessionRecord], cost: CostModel,
                   max_batch: int) -> MicroBatch | None:
        cands = _candidates(sessions, cost)
        if not cands:
            return None
        cands.sort(key=lambda c: (c.slack, c.item.deadline, c.item.session_id, c.item.lane))
        first = cands[0]
        same = [c for c in cands[1:] if c.item.shape == first.item.shape]
        batch = [first]
        duration = self._duration(batch, cost)
        feasible = self._feasible(now, duration, batch, cands)
        for c in same:
            if len(batch) >= max_batch:
                break
            trial = [*batch, c]
            d = self._duration(trial, cost)
            ok = self._feasible(now, d, trial, cands)
            if feasible <= ok:  # nobody who could make it is pushed past a deadline
                batch, duration, feasible = trial, d, ok
        return MicroBatch([c.item for c in batch], predicted_s=duration)

    @staticmethod
    def _duration(batch: list[_Candidate], cost: CostModel) -> float:
        return cost.predict(MicroBatch([c.item for c in batch]).batch_shape())

    @staticmethod
    def _feasible(now: float, duration: float, batch: list[_Candidate],
                  cands: list[_Candidate]) -> set[int]:
        """Indices (into cands) of forwards that still meet their deadline if `batch` runs now:
        those in it finish the rest of their block after it, the others start after it."""
        inside = {id(c) for c in batch}
        ok = set()
        for i, c in enumerate(cands):
            rest = c.remaining_s - c.t1 if id(c) in inside else c.remaining_s
            if now + duration + rest <= c.item.deadline:
                ok.add(i)
        return ok


class FIFOStreamBatch:
    name = "fifo"
    admission = False
    degradation = False

    def lanes(self, request: SessionRequest) -> int:
        return request.steps

    def next_batch(self, now: float, sessions: Sequence[SessionRecord], cost: CostModel,
                   max_batch: int) -> MicroBatch | None:
        ready = [(rec.t_ready, rec.t_admitted or 0.0, rec.session_id, rec) for rec in sessions
                 if rec.ready_items()]
        if not ready:
            return None
        rec = min(ready, key=lambda r: r[:3])[3]
        items = rec.ready_items()[:max_batch]
        batch = MicroBatch(items)
        batch.predicted_s = cost.predict(batch.batch_shape())
        return batch


class RoundRobin:
    name = "rr"
    admission = False
    degradation = False

    def __init__(self) -> None:
        self._turn = 0

    def lanes(self, request: SessionRequest) -> int:
        return 1

    def next_batch(self, now: float, sessions: Sequence[SessionRecord], cost: CostModel,
                   max_batch: int) -> MicroBatch | None:
        order = sorted(sessions, key=lambda r: (r.t_admitted or 0.0, r.session_id))
        if not order:
            return None
        start = self._turn % len(order)
        rotated = order[start:] + order[:start]
        items = [i for rec in rotated for i in rec.ready_items()]
        if not items:
            return None
        self._turn += 1
        shape = items[0].shape
        batch = MicroBatch([i for i in items if i.shape == shape][:max_batch])
        batch.predicted_s = cost.predict(batch.batch_shape())
        return batch


def make_policy(name: str) -> Policy:
    if name == "slo":
        return SLOBatching()
    if name == "slo-noadmit":
        return SLOBatching(admission=False)
    if name == "fifo":
        return FIFOStreamBatch()
    if name in ("rr", "round-robin"):
        return RoundRobin()
    raise ValueError(f"unknown scheduling policy {name!r}; choose one of {list(POLICY_NAMES)}")
