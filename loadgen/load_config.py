"""What a load-generator run asks for: the server, the arrival process, and every session's request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rollcast.loadgen.slo import SLO
from rollcast.scheduler.arrivals import Arrival, arrival_times

Transport = Literal["webrtc", "ws"]
TRANSPORTS = ("webrtc", "ws")


@dataclass(frozen=True)
class LoadConfig:
    url: str
    transport: Transport = "ws"
    arrival: Arrival = "poisson"
    rate: float = 0.5  # sessions per second
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration_s: float = 30.0  # arrivals stop after this
    session_seconds: float = 10.0  # each session streams this long after its first frame
    mode: Literal["t2v", "v2v"] = "t2v"
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    prompt: str = "a paper boat drifting down a rainy street, cinematic"
    steps: int | None = None
    first_frame_timeout_s: float = 30.0
    api_key: str | None = None

    def arrivals(self) -> list[float]:
        """Arrival offsets (s) from the run's start; the same seed gives the same list."""
        return arrival_times(self.rate, self.duration_s, arrival=self.arrival, burstiness=self.burstiness,
                             seed=self.seed)

    def session_body(self, index: int) -> dict[str, Any]:
        """The POST /v1/sessions body of session `index` (its seed is the run's plus its index)."""
        body: dict[str, Any] = {"mode": self.mode, "prompt": self.prompt, "seed": self.seed + index,
                                "slo": {"ttff_ms": self.slo.ttff_ms}}
        if self.steps is not None:
            body["steps"] = self.steps
        return body
