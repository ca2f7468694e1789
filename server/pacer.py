"""Output pacing: one frame per 1/fps on the monotonic clock, stamped with a 90 kHz pts.

The engine delivers frames in chunks (a block's worth at once); a viewer wants them evenly spaced.
The first frame goes out as soon as it exists (that is time-to-first-frame); after that frame k is
due at t_first + k/fps. When the next frame is not there at its tick (a late chunk), the last frame
is repeated: a counted freeze, and the clock keeps its rhythm, so the late chunk is never burst
out. When the sender itself falls behind by more than a frame (a stalled event loop) the clock is
re-anchored at now rather than catching up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rollcast.server.frame_queue import Frame, FrameQueue

VIDEO_CLOCK_RATE = 90_000  # RTP video clock


@dataclass(frozen=True)
class PacedFrame:
    frame: Frame
    pts: int  # in 1/90000 s
    repeated: bool  # a freeze: the previous frame again because the next one was late
    t_sent: float


class Pacer:
    def __init__(self, queue: FrameQueue, fps: float) -> None:
        self.queue = queue
        self.fps = fps
        self._t_first: float | None = None
        self._t_next: float | None = None  # the next frame's playout tick
        self._last: Frame | None = None

    def set_fps(self, fps: float) -> None:
        """Takes effect from the next frame (a degradation to a lower rate, or back)."""
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps

    async def next(self) -> PacedFrame | None:
        """The next frame at its playout time; None when the stream has ended and is drained."""
        if self._t_next is None:
            while not await self.queue.wait():
                if self.queue.closed:
                    return None
            frame = self.queue.get_nowait()
            assert frame is not None
            self._t_first = self._t_next = time.monotonic()
            return self._emit(frame, time.monotonic(), repeated=False)
        delay = self._t_next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        if now - self._t_next > 1.0 / self.fps:
            self._t_next = now  # the sender fell behind: re-anchor instead of bursting
        frame = self.queue.get_nowait()
        if frame is None:
            if self.queue.closed:
                return None
            assert self._last is not None
            return self._emit(self._last, now, repeated=True)
        return self._emit(frame, now, repeated=False)

    def _emit(self, frame: Frame, now: float, *, repeated: bool) -> PacedFrame:
        assert self._t_first is not None and self._t_next is not None
        # pts follows the playout ticks (even spacing), not the jitter of the actual send.
        pts = round((self._t_next - self._t_first) * VIDEO_CLOCK_RATE)
        self._t_next += 1.0 / self.fps
        self._last = frame
        return PacedFrame(frame, pts, repeated, now)
