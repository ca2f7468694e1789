"""StreamDiffusionV2's motion-aware noise controller for video-to-video.

Each input chunk is noised before denoising: x = s·ε + (1 - s)·z (the flow-matching forward process
at σ = s). Fast motion lowers s, so the output follows the input more closely; a still input keeps
the initial level, leaving the model room to restyle it. Per chunk (on pixels in [-1, 1]):

    d  = max over the chunk's frames of RMS(frame - previous frame)      (k = the chunk length)
    d̂  = clamp(d / motion_scale, 0, 1)
    s  = smoothing·(init_scale - scale_drop·d̂) + (1 - smoothing)·s_prev
    t0 = int(1000·s) - timestep_offset                                    (the first denoising step)

With the published constants (init 0.8, motion_scale 0.2, drop 0.1, smoothing 0.9, offset 100) s stays
in [0.7, 0.8] and t0 in [600, 700]. The deliberate gap between the noise added (σ = s) and the
timestep told to the model (t0 ≈ 1000·s - 100) is StreamDiffusionV2's; `timestep_offset=0` removes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NoiseControllerConfig:
    init_scale: float = 0.8
    motion_scale: float = 0.2  # RMS difference (pixels in [-1, 1]) that counts as full motion
    scale_drop: float = 0.1  # how far full motion lowers the noise scale
    smoothing: float = 0.9  # weight of the new estimate against the previous scale
    timestep_offset: int = 100
    adaptive: bool = True  # False: always init_scale (a fixed-strength v2v)

    def __post_init__(self) -> None:
        if not 0 < self.init_scale <= 1:
            raise ValueError(f"init noise scale must lie in (0, 1], got {self.init_scale}")
        if not 0 <= self.scale_drop < self.init_scale:
            raise ValueError(f"scale_drop must lie in [0, init_scale), got {self.scale_drop}")
        if self.motion_scale <= 0:
            raise ValueError(f"motion_scale must be positive, got {self.motion_scale}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must lie in (0, 1], got {self.smoothing}")


def motion_magnitude(frames: Tensor, previous: Tensor | None) -> Tensor:
    """Max over the chunk of the RMS difference between consecutive frames (a 0-d tensor).

    frames: [B, 3, T, H, W] in [-1, 1]; previous: the frame before the chunk [B, 3, 1, H, W] or
    None at the start of a stream (then the chunk's first frame has no predecessor).
    """
    seq = frames if previous is None else torch.cat([previous, frames], dim=2)
    if seq.shape[2] < 2:
        return frames.new_zeros(())
    diff = (seq[:, :, 1:] - seq[:, :, :-1]).float()
    rms = diff.pow(2).mean(dim=(0, 1, 3, 4)).sqrt()  # per frame, averaged over batch and pixels
    return rms.max()


class MotionNoiseController:
    """One per v2v session: turns each input chunk into (noise scale, first timestep)."""

    def __init__(self, config: NoiseControllerConfig | None = None) -> None:
        self.config = config or NoiseControllerConfig()
        self.scale = self.config.init_scale
        self.last_motion = 0.0

    @property
    def timestep(self) -> float:
        return float(int(1000 * self.scale) - self.config.timestep_offset)

    def update(self, frames: Tensor, previous: Tensor | None) -> tuple[float, float]:
        """Fold one chunk into the estimate; returns (noise scale, first timestep) for it.

        The first chunk of a stream keeps the initial scale, as StreamDiffusionV2 does: there is
        no earlier frame to measure motion against.
        """
        cfg = self.config
        if cfg.adaptive and previous is not None:
            # One host read per chunk (not per step): the scale is a host float the sampler needs.
            d = float(motion_magnitude(frames, previous))
            self.last_motion = d
            d_hat = min(max(d / cfg.motion_scale, 0.0), 1.0)
            target = cfg.init_scale - cfg.scale_drop * d_hat
            self.scale = cfg.smoothing * target + (1 - cfg.smoothing) * self.scale
        return self.scale, self.timestep
