"""The per-session SLO a load-generator run checks, parsed from `--slo key=value,...`.

A session meets its SLO when it was admitted, streamed for its whole length without an error, and
every bound given holds. Bounds are upper limits except `min_fps`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

# SLO key -> the session metric it bounds.
_METRIC = {
    "ttff_ms": "ttff_ms",
    "interval_p99_ms": "p99_frame_interval_ms",
    "jitter_p99_ms": "jitter_p99_ms",
    "deadline_miss_rate": "deadline_miss_rate",
    "freezes": "freezes",
    "dropped_frames": "frames_dropped",
    "min_fps": "delivered_fps",
}


@dataclass(frozen=True)
class SLO:
    ttff_ms: float = 1000.0
    interval_p99_ms: float | None = None
    jitter_p99_ms: float | None = None
    deadline_miss_rate: float | None = 0.01
    freezes: float | None = None
    dropped_frames: float | None = None
    min_fps: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """'ttff_ms=1000,interval_p99_ms=100' -> SLO; keys not given keep their defaults
        (TTFF 1 s, at most 1 % of frames late); `key=none` removes a bound."""
        values: dict[str, float | None] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in _METRIC:
                raise ValueError(f"--slo: expected KEY=VALUE with KEY one of {sorted(_METRIC)}, got {part!r}")
            if raw.strip().lower() == "none":
                if key == "ttff_ms":
                    raise ValueError("--slo: ttff_ms cannot be removed (it anchors the frame deadlines)")
                values[key] = None
                continue
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"--slo: {key} must be a number, got {raw!r}") from None
            if not value >= 0 or value == float("inf") or (key == "ttff_ms" and value == 0):
                raise ValueError(f"--slo: {key} must be a finite number above 0, got {raw!r}")
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]

    def bounds(self) -> dict[str, float]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def violations(self, metrics: Mapping[str, object]) -> list[str]:
        """The SLO keys this session's metrics break (a missing metric breaks its bound)."""
        broken = []
        for key, bound in self.bounds().items():
            value = metrics.get(_METRIC[key])
            missing = not isinstance(value, int | float)
            if missing or ((value < bound) if key == "min_fps" else (value > bound)):  # type: ignore[operator]
                broken.append(key)
        return broken
