"""Few-step flow-matching sampler of the distilled causal Wan models.

The σ grid is Wan's training scheduler with shift s: σ_raw = linspace(1, 0, 1001)[:-1],
σ = s·σ_raw / (1 + (s-1)·σ_raw), timestep = 1000·σ. A timestep's σ is the nearest grid point.
The model predicts a flow v = ε - x0, so x0 = x_t - σ·v, and between steps the block is
re-noised with *fresh* noise to the next level: x = (1-σ')·x0 + σ'·ε (not an Euler step).

With `warp`, a trained step list like [1000, 750, 500, 250] maps through the grid
(`cat(timesteps, [0])[1000 - list]`); shift 5 gives [1000, 937.5, 833.33, 625].

Timesteps and σ are host floats known before a step runs, so they cost no device sync.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplerConfig:
    shift: float = 5.0
    trained_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp: bool = True
    # How fewer steps than trained are chosen: spread over the list (4 -> [0, 2] -> [0]) or the
    # first k (StreamDiffusionV2's `--step k`).
    subset: Literal["spread", "prefix"] = "spread"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"sampler shift must be positive, got {self.shift}")
        if not self.trained_steps or any(
            not 0 < t <= self.num_train_timesteps for t in self.trained_steps
        ):
            raise ValueError(f"sampler steps must lie in (0, {self.num_train_timesteps}]: "
                             f"{self.trained_steps}")
        if list(self.trained_steps) != sorted(self.trained_steps, reverse=True):
            raise ValueError(f"sampler steps must decrease: {self.trained_steps}")

    @classmethod
    def preset(cls, name: str) -> SamplerConfig:
        try:
            return SAMPLERS[name]
        except KeyError:
            raise ValueError(f"unknown sampler preset {name!r}; presets: {sorted(SAMPLERS)}") from None


SAMPLERS: dict[str, SamplerConfig] = {
    # Self-Forcing, LongLive, Rolling/Reward Forcing, Krea: shift 5, warped 4-step list.
    "self-forcing": SamplerConfig(),
    # StreamDiffusionV2 text-to-video: shift 8, unwarped, `--step k` keeps the first k.
    "streamdiffusionv2": SamplerConfig(shift=8.0, warp=False, subset="prefix"),
    # StreamDiffusionV2 video-to-video: starts from a noised input at t=700.
    "streamdiffusionv2-v2v": SamplerConfig(
        shift=8.0, trained_steps=(700.0, 500.0, 400.0, 200.0), warp=False, subset="prefix"
    ),
}


@dataclass
class FlowMatchSampler:
    config: SamplerConfig
    _grid_t: list[float] = field(init=False, repr=False)  # ascending timesteps of the grid

    def __post_init__(self) -> None:
        n = self.config.num_train_timesteps
        s = self.config.shift
        raw = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        sig = s * raw / (1 + (s - 1) * raw)
        self._grid_desc = (sig * n).tolist()  # descending, as Wan indexes it
        self._grid_t = sorted(self._grid_desc)

    def timesteps(self, num_steps: int | None = None) -> list[float]:
        """The denoising timesteps for `num_steps` (default: all trained steps)."""
        cfg = self.config
        trained = list(cfg.trained_steps)
        k = len(trained) if num_steps is None else num_steps
        if not 1 <= k <= len(trained):
            raise ValueError(f"num_steps must be between 1 and {len(trained)}, got {num_steps}")
        if cfg.subset == "prefix":
            chosen = trained[:k]
        else:
            chosen = [trained[round(i * len(trained) / k)] for i in range(k)]
        if cfg.warp:
            table = [*self._grid_desc, 0.0]
            n = cfg.num_train_timesteps
            chosen = [table[n - round(t)] for t in chosen]
        return chosen

    def sigma(self, t: float) -> float:
        """σ of the grid point nearest to timestep t (t = 0 is clean: σ = 0)."""
        if t <= 0:
            return 0.0
        grid = self._grid_t
        i = bisect.bisect_left(grid, t)
        cands = [grid[j] for j in (i - 1, i) if 0 <= j < len(grid)]
        nearest = min(cands, key=lambda g: abs(g - t))
        return nearest / self.config.num_train_timesteps

    @staticmethod
    def to_x0(x_t: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
        """x0 = x_t - σ·v; sigma broadcasts per batch row ([B, 1, 1, 1, 1])."""
        return x_t - sigma * v

    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
        """The forward process: (1-σ)·x0 + σ·ε."""
        return (1 - sigma) * x0 + sigma * noise
