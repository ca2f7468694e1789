"""Several independent pipelines (`--replicas N`), each with its own engine, behind one front.

A replica is a whole serving unit: its own pipeline stages (KV caches, prompt K/V), executor and
engine loop, so sessions on different replicas never batch together and a replica that loses a
stage fails and rebuilds alone. `ReplicaSet` offers the engine's client calls: a new session goes
to the replica whose admission predicts the most slack for it (admitted without degrading anyone
first, then with degradation, then the shortest queue wait); every later call for that session
goes to the same replica. Capacity and metrics are reported per replica and in total.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from rollcast.scheduler.admission import AdmissionDecision
from rollcast.scheduler.engine import Engine
from rollcast.scheduler.session import SessionRecord, SessionRequest


def placement_score(decision: AdmissionDecision, max_utilization: float) -> tuple[int, float]:
    """Lower is better: (how it would be taken, then how little room it leaves)."""
    if decision.outcome == "admitted":
        slack = max_utilization - decision.predicted_load
        return (1 if decision.degrade else 0), -slack
    if decision.outcome == "queued":
        wait = decision.estimated_wait_s
        return 2, wait if wait is not None else math.inf
    return 3, 0.0


class ReplicaSet:
    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("a replica set needs at least one engine")
        self.engines = list(engines)
        self._owner: dict[str, int] = {}  # session -> replica index
        self._lock = threading.Lock()  # placement: one new session at a time

    def __len__(self) -> int:
        return len(self.engines)

    # -- placement --------------------------------------------------------------------------------

    def place(self, request: SessionRequest) -> int:
        """The replica `request` should go to (by predicted slack; ties: the lower index)."""
        scores = [placement_score(e.preview(request), e.config.admission.max_utilization)
                  for e in self.engines]
        return min(range(len(scores)), key=lambda i: scores[i])

    def open_session(self, request: SessionRequest) -> AdmissionDecision:
        with self._lock:
            if request.session_id in self._owner:
                raise ValueError(f"session {request.session_id!r} exists already")
            index = self.place(request)
            self._owner[request.session_id] = index
        return self.engines[index].open_session(request)

    def replica_of(self, session_id: str) -> int:
        try:
            return self._owner[session_id]
        except KeyError:
            raise KeyError(session_id) from None

    def engine_of(self, session_id: str) -> Engine:
        return self.engines[self.replica_of(session_id)]

    # -- the engine's client calls, routed ----------------------------------------------------------

    def close_session(self, session_id: str, reason: str = "closed") -> None:
        self.engine_of(session_id).close_session(session_id, reason)

    def set_steps(self, session_id: str, steps: int) -> int:
        return self.engine_of(session_id).set_steps(session_id, steps)

    def set_prompt(self, session_id: str, prompt: object, transition_blocks: int = 0) -> int:
        return self.engine_of(session_id).set_prompt(session_id, prompt, transition_blocks)

    def push_input(self, session_id: str, frames: object) -> int:
        return self.engine_of(session_id).push_input(session_id, frames)

    def set_paused(self, session_id: str, paused: bool) -> int:
        return self.engine_of(session_id).set_paused(session_id, paused)

    @property
    def sessions(self) -> dict[str, SessionRecord]:
        out: dict[str, SessionRecord] = {}
        for e in self.engines:
            out.update(e.sessions)
        return out

    # -- lifecycle and views ------------------------------------------------------------------------

    def start(self) -> None:
        for e in self.engines:
            e.start()

    def stop(self) -> None:
        for e in self.engines:
            e.stop()

    @property
    def running(self) -> bool:
        return all(e.running for e in self.engines)

    @property
    def pipeline_failures(self) -> int:
        return sum(e.pipeline_failures for e in self.engines)

    def snapshot(self) -> dict[str, object]:
        """Totals (predicted load: the mean over replicas, 1 = all full) and `replicas`, each
        replica's own snapshot."""
        snaps = [e.snapshot() for e in self.engines]
        batches = sum(e.batches for e in self.engines)
        items = sum(e.batched_items for e in self.engines)
        return {
            "active": sum(int(s["active"]) for s in snaps),  # type: ignore[call-overload]
            "queued": sum(int(s["queued"]) for s in snaps),  # type: ignore[call-overload]
            "predicted_load": sum(float(s["predicted_load"]) for s in snaps) / len(snaps),  # type: ignore[arg-type]
            "mean_batch": items / batches if batches else 0.0,
            "replicas": snaps,
        }
