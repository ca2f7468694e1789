"""The raw record of one load-generator session: what was asked, what the server answered, every
frame received. Metrics are computed from it afterwards (`frame_metrics`), never while streaming."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rollcast.loadgen.frame_metrics import FrameArrival

Outcome = Literal["pending", "completed", "rejected", "error"]


class StreamError(Exception):
    """A session's stream failed; `kind` is the key it is counted under in `errors_by_kind`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class SessionTrace:
    index: int
    scheduled_s: float  # arrival offset from the run's start
    t_request: float = 0.0  # client monotonic time the POST was sent
    outcome: Outcome = "pending"
    http_status: int | None = None
    admission: Literal["admitted", "queued"] | None = None  # the create answer: 201 or 202
    session_id: str | None = None
    fps: float = 16.0
    resolution: tuple[int, int] | None = None
    reject_reason: str | None = None  # the server's error code on 503 / 429
    error: str | None = None  # kind, e.g. "connect", "no_first_frame", "stream_stopped", "http_422"
    error_message: str | None = None
    stop_reason: str | None = None  # the server's stream_stopped reason, when it came
    frames: list[FrameArrival] = field(default_factory=list)
    unmatched_frames: int = 0  # WebRTC frames received whose server frame id never arrived
    messages: dict[str, int] = field(default_factory=dict)  # control messages received, by type
    server_stats: dict[str, Any] | None = None  # GET /v1/sessions/{id} after the end

    def fail(self, kind: str, message: str) -> None:
        self.outcome = "error"
        self.error = kind
        self.error_message = " ".join(message.split())[:300]

    def count_message(self, kind: str) -> None:
        self.messages[kind] = self.messages.get(kind, 0) + 1

    @property
    def admission_wait_s(self) -> float:
        """The server's measure of the admission wait (request to admission, on its clock)."""
        stats = (self.server_stats or {}).get("stats") or {}
        wait = stats.get("queue_wait_ms")
        return float(wait) / 1e3 if isinstance(wait, int | float) else 0.0
