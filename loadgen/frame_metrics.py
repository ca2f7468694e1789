"""What one client saw of one stream, reduced to numbers: TTFF, frame intervals, jitter, freezes,
dropped frames, deadline misses, delivered fps.

Input is the client's own record: every received frame's arrival time on the client's monotonic
clock, the server's frame id (the stream's output frame index) and the server's "repeated" flag (the
pacer sent the previous picture again because the next one was late). Definitions (design §7,
reference/performance.md §5):

- TTFF: request sent -> first frame received, admission wait included (reported on its own too).
- Frame intervals: gaps between consecutive received frames, what the player is handed.
  Jitter: p99 of |interval - 1/fps|.
- Freezes: the picture stands still. Counted on *new-content* frames (first arrival of each frame
  id, repeats skipped), since the pacer keeps sending the old picture at the normal cadence while
  the next frame is late: an interval between new frames >= max(3 x mean, mean + 150 ms), with the
  mean over the same intervals.
- Dropped: frame-id gaps. Ids run 0, 1, 2, ...; every id below the highest one seen that never
  arrived was dropped (newest-wins queues on the way).
- Deadlines: frame i is due at t_active + TTFF budget + i/fps, with t_active = request + admission
  wait. A frame arriving later, or never (a gap), is a miss.
- Delivered fps: new-content frames per second between the first and the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FREEZE_FACTOR = 3.0
FREEZE_MARGIN_S = 0.150


@dataclass(frozen=True, slots=True)
class FrameArrival:
    t: float  # client monotonic seconds
    frame_id: int
    repeated: bool = False


def percentile_ms(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default) in ms; None when empty."""
    arr = np.asarray(values, dtype=np.float64)
    return round(float(np.percentile(arr, q)) * 1e3, 3) if arr.size else None


def new_content(frames: Sequence[FrameArrival]) -> list[FrameArrival]:
    """The first arrival of each frame id, in arrival order (repeats and duplicates skipped)."""
    seen: set[int] = set()
    out = []
    for f in frames:
        if f.repeated or f.frame_id in seen:
            continue
        seen.add(f.frame_id)
        out.append(f)
    return out


def freeze_count(intervals: np.ndarray) -> int:
    """Intervals >= max(3 x mean, mean + 150 ms)."""
    if intervals.size == 0:
        return 0
    mean = float(intervals.mean())
    return int((intervals >= max(FREEZE_FACTOR * mean, mean + FREEZE_MARGIN_S)).sum())


def dropped_ids(ids: Sequence[int]) -> int:
    """Ids below the highest one received that never arrived."""
    if not ids:
        return 0
    return max(ids) + 1 - len(set(ids))


def deadline_misses(new: Sequence[FrameArrival], *, t_active: float, ttff_budget_s: float,
                    fps: float) -> tuple[int, int]:
    """(misses, frames due): frames due are ids 0..highest seen; a missing id is a miss."""
    if not new:
        return 0, 0
    ids = np.fromiter((f.frame_id for f in new), dtype=np.float64, count=len(new))
    t = np.fromiter((f.t for f in new), dtype=np.float64, count=len(new))
    due = t_active + ttff_budget_s + ids / fps
    expected = int(ids.max()) + 1
    late = int((t > due).sum())
    return late + (expected - len(new)), expected


def fps_series(new: Sequence[FrameArrival], bucket_s: float = 1.0) -> list[int]:
    """New-content frames in each whole `bucket_s` window since the first frame (for time-series
    plots; a last, partial window would read as a slump)."""
    if not new:
        return []
    t = np.asarray([f.t - new[0].t for f in new])
    whole = int(t[-1] // bucket_s)
    counts = np.bincount((t // bucket_s).astype(np.int64), minlength=whole + 1)
    return [int(c) for c in counts[:whole]]


def session_metrics(frames: Sequence[FrameArrival], *, fps: float, t_request: float,
                    admission_wait_s: float, ttff_budget_s: float) -> dict[str, float | int | None]:
    """Every per-session number above, keyed as in the run's JSON (ms for times)."""
    new = new_content(frames)
    t_all = np.asarray([f.t for f in frames], dtype=np.float64)
    intervals = np.diff(t_all)
    new_intervals = np.diff(np.asarray([f.t for f in new], dtype=np.float64))
    misses, due = deadline_misses(new, t_active=t_request + admission_wait_s,
                                  ttff_budget_s=ttff_budget_s, fps=fps)
    span = new[-1].t - new[0].t if len(new) > 1 else 0.0
    return {
        "ttff_ms": round((frames[0].t - t_request) * 1e3, 3) if frames else None,
        "admission_wait_ms": round(admission_wait_s * 1e3, 3),
        "frames_received": len(frames),
        "frames_delivered": len(new),
        "repeated_frames": sum(f.repeated for f in frames),
        "frames_dropped": dropped_ids([f.frame_id for f in new]),
        "p50_frame_interval_ms": percentile_ms(intervals, 50),
        "p95_frame_interval_ms": percentile_ms(intervals, 95),
        "p99_frame_interval_ms": percentile_ms(intervals, 99),
        "jitter_p99_ms": percentile_ms(np.abs(intervals - 1.0 / fps), 99),
        "freezes": freeze_count(new_intervals),
        "deadline_misses": misses,
        "deadline_miss_rate": round(misses / due, 6) if due else None,
        "delivered_fps": round((len(new) - 1) / span, 3) if span > 0 else None,
        "streamed_s": round(float(t_all[-1] - t_all[0]), 3) if frames else 0.0,
    }
