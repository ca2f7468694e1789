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
from typing import Protocol

from rollcast.scheduler.clock import FakeClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.session import SessionRecord
from rollcast.scheduler.work import BatchResult, MicroBatch


class CapacityError(RuntimeError):
    """`open` found no room for the session (cache rows); the engine rejects it as
    `capacity_exhausted` with a retry-after, not as unsupported."""


class Executor(Protocol):
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

    def submit(self, batch: MicroBatch) -> None: ...

    def collect(self) -> BatchResult: ...


class SimulatedExecutor:
    """Takes the time the cost model predicts (times a seeded log-normal jitter) on a fake clock."""

    def __init__(self, clock: FakeClock, cost: CostModel, *, jitter: float = 0.05, seed: int = 0) -> None:
        self.clock = clock
        self.cost = cost
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.open_sessions: set[str] = set()
        self._inflight: tuple[MicroBatch, float, float] | None = None

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

    def submit(self, batch: MicroBatch) -> None:
        if self._inflight is not None:
            raise RuntimeError("one micro-batch at a time: collect the previous one first")
        unknown = [i.session_id for i in batch.items if i.session_id not in self.open_sessions]
        if unknown:
            raise ValueError(f"sessions not open on the executor: {sorted(set(unknown))}")
        start = self.clock.now()
        seconds = self.cost.predict(batch.batch_shape())
        if self.jitter > 0:
            seconds *= math.exp(self.rng.gauss(0.0, self.jitter))
        self._inflight = (batch, start, start + seconds)

    def collect(self) -> BatchResult:
        if self._inflight is None:
            raise RuntimeError("nothing submitted")
        batch, start, end = self._inflight
        self._inflight = None
        self.clock.advance_to(end)
        frames: dict[str, object | None] = {i.session_id: None for i in batch.items if i.finishes_block}
        return BatchResult(batch, start, end, frames=frames)
