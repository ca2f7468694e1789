"""Engine events: what happened to which session, stamped on the engine's monotonic clock.

The server turns them into metrics, SSE messages and data-channel messages; the simulator and
tests read them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal[
    "queued", "admitted", "rejected", "block_done", "frames_ready", "deadline_miss",
    "degraded", "recovered", "finished", "failed", "closed",
    "batch_done",  # per micro-batch, session_id "": size and seconds by stage (for metrics)
    "pipeline_lost", "pipeline_rebuilt",  # session_id "": a stage died / the pipeline is back
]


@dataclass(frozen=True)
class EngineEvent:
    kind: EventKind
    t: float
    session_id: str
    data: dict[str, Any] = field(default_factory=dict)
