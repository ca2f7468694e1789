"""Video-to-video input: frames from a client's camera or socket, sampled to the session's rate.

Cameras send 30 fps or more at any size; a session consumes frames at its own fps at the model's
resolution. Frames arriving faster than that are dropped (counted: the newest frame of each tick
wins) and the rest are centre-cropped to the model's aspect ratio and resized with libswscale.
"""

from __future__ import annotations

import av
import numpy as np


def fit_frame(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] of any size -> uint8 [height, width, 3], centre-cropped to the aspect."""
    width, height = size
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    if w * height > h * width:  # too wide: crop the sides
        cw = max(1, round(h * width / height))
        x0 = (w - cw) // 2
        rgb = rgb[:, x0:x0 + cw]
    elif w * height < h * width:  # too tall: crop top and bottom
        ch = max(1, round(w * height / width))
        y0 = (h - ch) // 2
        rgb = rgb[y0:y0 + ch]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


class InputSampler:
    """Keeps at most one input frame per 1/fps tick of the arrival clock."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self._t_next: float | None = None
        self.kept = 0
        self.dropped = 0

    def keep(self, t_arrival: float) -> bool:
        period = 1.0 / self.fps
        if self._t_next is None or t_arrival >= self._t_next - 0.25 * period:
            # Tick on the ideal grid; after a gap of more than a frame, restart it from now.
            on_grid = self._t_next is not None and t_arrival - self._t_next < period
            base = self._t_next if on_grid else t_arrival
            self._t_next = base + period
            self.kept += 1
            return True
        self.dropped += 1
        return False
