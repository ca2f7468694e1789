"""A synthetic camera for video-to-video load: a bright bar sweeping over a dark gradient.

Motion matters: the server's motion-aware noise controller reacts to it, so a still test pattern
would measure a different workload than a webcam does. Frames are cheap (one slice write each)."""

from __future__ import annotations

import numpy as np
from aiortc import VideoStreamTrack
from av import VideoFrame


class MovingBar:
    def __init__(self, width: int, height: int, *, speed_px: int = 4) -> None:
        self.width, self.height, self.speed_px = width, height, speed_px
        ramp = np.linspace(0, 96, width, dtype=np.float32).astype(np.uint8)
        self._background = np.broadcast_to(ramp[None, :, None], (height, width, 3)).copy()
        self._bar = max(2, width // 16)

    def frame(self, k: int) -> np.ndarray:
        """Frame k, uint8 [H, W, 3]."""
        img = self._background.copy()
        x = (k * self.speed_px) % self.width
        img[:, x:x + self._bar] = (255, 240, 200)
        return img


class MovingBarTrack(VideoStreamTrack):
    """The same pattern as a WebRTC camera track (aiortc paces it at 30 fps)."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__()
        self.source = MovingBar(width, height)
        self._k = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(self.source.frame(self._k), format="rgb24")
        self._k += 1
        frame.pts, frame.time_base = pts, time_base
        return frame
