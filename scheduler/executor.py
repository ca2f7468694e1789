"""The executor interface the engine drives, and the simulated executor of the simulator.

An executor owns everything with tensors: per-session worker state (cache rows, VAE states, lanes)
and the forwards. The engine opens and closes sessions on it, submits one micro-batch at a time and
collects the result, and asks it every tick which sessions have the input to start their next
block (`ready`). The local executor (`rollcast.scheduler.local_executor`) runs the real model;
pipeline-parallel and Ray executors implement the same methods.

Threads: `submit`/`collect`, `ready` and `set_steps` (when the engine's record switches step
count, at a block boundary) run on the engine's loop; `open`, `close`, `set_prompt` and
`push_frames` come from client threads under the engine's lock, possibly while a `collect` (a
forward) runs on the loop, so an executor must make them safe against it.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Protocol

from rollcast.scheduler.clock import FakeClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.session import SessionRecord
from rollcast.scheduler.work import BatchResult, MicroBatch


class CapacityError(RuntimeError):
    """`open` found no room for the session (cache rows); the engine rejects it as
    `capacity_exhausted` with a retry-after, not as unsupported."""


class Executor(Protocol):
    # Micro-batches it holds at once (`submit`ted, not yet `collect`ed): its pipeline stages, 1
    # without. Results come back in submission order.
    depth: int

    def open(self, record: SessionRecord) -> None:
        """Set up the session's worker state; raises (ValueError: a setup it cannot run,
        CapacityError: no room) leaving nothing of it behind."""
        ...

    def close(self, session_id: str) -> None: ...

    def set_steps(self, session_id: str, steps: int) -> None:
        """The session's blocks from the next one to start take `steps` steps."""
        ...

    def set_prompt(self, session_id: str, prompt: object, transition_blocks: int = 0) -> None: ...

    def push_frames(self, session_id: str, frames: object) -> int:
        """Buffer v2v input frames (cheap, any thread); returns the frames not yet encoded."""
        ...

    def ready(self, session_id: str) -> bool:
        """Whether the session can start its next block now (t2v: always; v2v: its input is there,
        or the block is under way). Cheap; called every tick."""
        ...

    def submit(self, batch: MicroBatch) -> None:
        """Start a micro-batch; at most `depth` may be in flight, no session lane in two."""
        ...

    def rebuild(self) -> list[str]:
        """After a result with `lost` set: drop what was in flight, start a fresh pipeline (new
        stage processes or actors) and carry the open sessions over; returns those it could not
        (the engine ends them). Raises when no pipeline could be started (all sessions are gone)."""
        ...

    def collect(self) -> BatchResult:
        """Wait for the oldest micro-batch in flight."""
        ...


class SimulatedExecutor:
    """Takes the time the cost model predicts (times a seeded log-normal jitter) on a fake clock.

    With `stages` > 1 it simulates a balanced pipeline: a forward passes the stages in order, each
    taking 1/stages of its time, a stage works on one micro-batch at a time, and up to `stages`
    micro-batches are in flight."""

    def __init__(self, clock: FakeClock, cost: CostModel, *, jitter: float = 0.05, seed: int = 0,
                 stages: int = 1) -> None:
        if stages < 1:
            raise ValueError(f"stages must be at least 1, got {stages}")
        self.clock = clock
        self.cost = cost
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.depth = stages
        self.open_sessions: set[str] = set()
        self._inflight: deque[tuple[MicroBatch, float, float]] = deque()
        self._stage_free = [0.0] * stages
        self.lose_pipeline: str | None = None  # set it to make the next collect report a lost pipeline
        self.drop_on_rebuild: set[str] = set()  # sessions a rebuild cannot carry over
        self.rebuilds = 0

    def open(self, record: SessionRecord) -> None:
        self.open_sessions.add(record.session_id)

    def close(self, session_id: str) -> None:
        self.open_sessions.discard(session_id)

    def set_steps(self, session_id: str, steps: int) -> None:
        pass  # the engine's record carries the step count; nothing to hold here

    def set_prompt(self, session_id: str, prompt: object, transition_blocks: int = 0) -> None:
        pass  # prompts cost nothing in simulation

    def push_frames(self, session_id: str, frames: object) -> int:
        return 0  # simulated v2v input is always there

    def ready(self, session_id: str) -> bool:
        return True

    def rebuild(self) -> list[str]:
        self._inflight.clear()
        self._stage_free = [0.0] * self.depth
        self.rebuilds += 1
        dropped = sorted(self.open_sessions & self.drop_on_rebuild)
        self.open_sessions -= self.drop_on_rebuild
        return dropped

    def submit(self, batch: MicroBatch) -> None:
        if len(self._inflight) >= self.depth:
            raise RuntimeError(f"{self.depth} micro-batches in flight: collect one first")
        unknown = [i.session_id for i in batch.items if i.session_id not in self.open_sessions]
        if unknown:
            raise ValueError(f"sessions not open on the executor: {sorted(set(unknown))}")
        start = self.clock.now()
        seconds = self.cost.predict(batch.batch_shape())
        if self.jitter > 0:
            seconds *= math.exp(self.rng.gauss(0.0, self.jitter))
        t = start
        for k, free in enumerate(self._stage_free):  # each stage: after the last, when free
            t = max(t, free) + seconds / self.depth
            self._stage_free[k] = t
        self._inflight.append((batch, start, t))

    def collect(self) -> BatchResult:
        if not self._inflight:
            raise RuntimeError("nothing submitted")
        batch, start, end = self._inflight.popleft()
        self.clock.advance_to(end)
        if self.lose_pipeline is not None:
            lost, self.lose_pipeline = self.lose_pipeline, None
            return BatchResult(batch, start, end, lost=lost)
        frames: dict[str, object | None] = {i.session_id: None for i in batch.items if i.finishes_block}
        return BatchResult(batch, start, end, frames=frames)
