"""A bounded, newest-frame-wins queue of video frames between the engine thread and a transport.

The engine thread puts whole chunks (many frames at once); a transport on the event loop takes one
frame per playout tick. When the queue is full the oldest frames go (live video: a late frame is
worth less than a fresh one) and every dropped frame is counted. Waiting is asyncio-side only: the
producer wakes the loop with `call_soon_threadsafe`, never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    frame_id: int  # the session's output frame index (server-stamped, end to end)
    pixels: np.ndarray  # uint8 [H, W, 3]
    t_ready: float  # monotonic time the engine handed it over


class FrameQueue:
    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        if capacity < 1:
            raise ValueError(f"frame queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._frames: deque[Frame] = deque()
        self._lock = threading.Lock()
        self._loop = loop
        self._available = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def put_many(self, frames: list[Frame]) -> int:
        """Append frames (any thread); returns how many old frames were dropped to make room."""
        with self._lock:
            if self.closed:
                return 0
            self._frames.extend(frames)
            over = max(0, len(self._frames) - self.capacity)
            for _ in range(over):
                self._frames.popleft()
            self.dropped += over
        self._wake()
        return over

    def get_nowait(self) -> Frame | None:
        with self._lock:
            frame = self._frames.popleft() if self._frames else None
            if not self._frames and not self.closed:
                self._available.clear()
            return frame

    async def wait(self) -> bool:
        """Until a frame is available or the queue is closed; True when a frame is there."""
        await self._available.wait()
        with self._lock:
            return bool(self._frames)

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self._wake()

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has shut down: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._available.set)
