"""What every streaming VAE offers the pipeline, and the factory that picks one.

Pixels are [B, 3, T, H, W] in [-1, 1] (Wan's layout); latents are in the DiT's space, i.e. what the
causal DiT consumes and produces. The Wan VAE normalises with its per-channel mean/std on the way
in and out; the tiny VAE was trained on that same normalised space and applies nothing.

Both VAEs are causal in time and keep their temporal memory in an explicit per-session state object,
so one module serves many sessions: each session owns an encode state and a decode state, and
feeding a video through `encode_chunk`/`decode_chunk` in pieces gives the same result as the
whole-sequence `encode`/`decode`.

Frame counts follow Wan's causal rule: n latent frames <-> 1 + 4(n - 1) video frames. The first
latent of a state decodes to 1 frame and every later one to 4; the first encode call of a state
takes 1 + 4k frames (k >= 0) and returns 1 + k latents, later calls take 4k frames and return k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

VAE_KINDS = ("wan", "tiny")
VAESize = Literal["full", "small"]


@runtime_checkable
class StreamingVAE(Protocol):
    kind: str  # "wan" | "tiny"
    z_dim: int
    temporal_stride: int  # 4
    spatial_stride: int  # 8

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_state(self) -> Any: ...

    def decode_state(self) -> Any: ...

    def encode_chunk(self, frames: Tensor, state: Any) -> Tensor: ...

    def decode_chunk(self, latents: Tensor, state: Any) -> Tensor: ...

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


def video_frames(latent_frames: int) -> int:
    """Video frames that n latent frames decode to (Wan's causal rule)."""
    return 0 if latent_frames <= 0 else 1 + 4 * (latent_frames - 1)


def latent_frames(video_frames: int) -> int:
    """Latent frames needed to decode at least `video_frames` frames."""
    return 0 if video_frames <= 0 else 1 + -(-(video_frames - 1) // 4)


def build_vae(
    kind: str,
    size: VAESize,
    *,
    checkpoint: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> StreamingVAE:
    """A VAE of `kind` at `size` ("full" = the published shapes, "small" = the tiny model's),
    loaded from `checkpoint` or randomly initialised from `seed`."""
    if kind == "wan":
        from rollcast.workers.wan_vae import WanVAE, WanVAEConfig

        return WanVAE.build(WanVAEConfig.preset(size), checkpoint=checkpoint, device=device,
                            dtype=dtype, seed=seed)
    if kind == "tiny":
        from rollcast.workers.tiny_vae import TinyVAE, TinyVAEConfig

        return TinyVAE.build(TinyVAEConfig.preset(size), checkpoint=checkpoint, device=device,
                             dtype=dtype, seed=seed)
    raise ValueError(f"unknown VAE {kind!r}; choose one of {list(VAE_KINDS)}")


@dataclass(frozen=True)
class VaeSpec:
    """Everything needed to build the same VAE in another process (a pipeline's decode stage)."""

    kind: str
    size: VAESize
    checkpoint: Path | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def build(self, device: str | None = None) -> StreamingVAE:
        return build_vae(self.kind, self.size, checkpoint=self.checkpoint, device=device or self.device,
                         dtype=self.dtype, seed=self.seed)
