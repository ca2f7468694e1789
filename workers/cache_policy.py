"""Rolling KV cache policies of the causal Wan family.

A policy says which frames the self-attention cache keeps, where RoPE positions come from, which
forwards write it and what a prompt switch does. The mechanics (ring buffers, writes, attention)
live in `kv_cache.py`; the per-block bookkeeping in `stream_state.py`.

- self-forcing: sink + window of clean K/V; RoPE baked at absolute positions; every denoising
  step writes the block's slots and a t=0 context pass rewrites them clean; a prompt switch
  only swaps the cross-attention K/V.
- streamdiffusionv2: sink + window of noisy K/V (no context pass); RoPE baked, positions restart
  every 50 frames; adaptive sink refresh (a new frame unlike a sink frame replaces it).
- longlive: a frame sink + short window, clean K/V; on a prompt switch the window is re-cached at
  t=0 with the new prompt.

`rope="late"` on any policy stores un-rotated K and rotates at attention time with
window-relative positions (sink first, then the window in order), which has no position limit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

RopeMode = Literal["baked", "late"]


@dataclass(frozen=True)
class CachePolicy:
    name: str
    sink_frames: int
    # Most recent latent frames kept besides the sink, *including* the block being denoised.
    window_frames: int
    rope: RopeMode = "baked"
    # Self-Forcing: after the last denoising step, run the block again at t=0 so the cache keeps
    # clean K/V. Without it (StreamDiffusionV2) the last step's noisy K/V stay.
    context_pass: bool = True
    # StreamDiffusionV2: when a block's RoPE start position reaches this, restart it at
    # `capacity - frames_per_block` (positions only; the cache keeps its frames).
    rope_reset_frames: int | None = None
    # StreamDiffusionV2: when a new frame's mean K/V is less similar (cosine, averaged over K and
    # V) than this to some sink frame, it overwrites the least similar sink frame.
    sink_refresh_threshold: float | None = None
    # LongLive: on a prompt switch, recompute the window's K/V at t=0 with the new prompt.
    recache_on_prompt_switch: bool = False
    # LongLive `global_sink`: the re-cache leaves the sink frames as they are.
    keep_sink_on_recache: bool = True

    def __post_init__(self) -> None:
        if self.sink_frames < 0 or self.window_frames < 1:
            raise ValueError(
                f"cache policy {self.name!r}: sink_frames must be >= 0 and window_frames >= 1, "
                f"got {self.sink_frames} and {self.window_frames}"
            )
        if self.rope not in ("baked", "late"):
            raise ValueError(f"cache policy {self.name!r}: rope must be 'baked' or 'late'")
        if self.sink_refresh_threshold is not None and self.rope != "baked":
            raise ValueError(f"cache policy {self.name!r}: sink refresh needs rope='baked'")
        if self.sink_refresh_threshold is not None and self.sink_frames == 0:
            raise ValueError(f"cache policy {self.name!r}: sink refresh needs sink_frames > 0")

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames

    def validate_block(self, frames_per_block: int) -> None:
        if self.window_frames < frames_per_block:
            raise ValueError(
                f"cache policy {self.name!r}: window_frames {self.window_frames} is smaller than "
                f"a block of {frames_per_block} frames"
            )
        if self.sink_refresh_threshold is not None and frames_per_block != 1:
            raise ValueError(
                f"cache policy {self.name!r}: adaptive sink refresh works on 1-frame blocks, "
                f"not {frames_per_block}"
            )

    def replace(self, **changes: object) -> CachePolicy:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def preset(cls, name: str) -> CachePolicy:
        try:
            return POLICIES[name]
        except KeyError:
            raise ValueError(f"unknown cache policy {name!r}; presets: {sorted(POLICIES)}") from None


POLICIES: dict[str, CachePolicy] = {
    # Self-Forcing trained with 21-frame context; a 3-frame sink keeps the first block forever.
    "self-forcing": CachePolicy("self-forcing", sink_frames=3, window_frames=18),
    # StreamDiffusionV2 `wan_causal_dmd_v2v.yaml`: num_kv_cache 6 with 3 sink frames, tau 0.2,
    # t_refresh 50, noisy K/V.
    "streamdiffusionv2": CachePolicy(
        "streamdiffusionv2", sink_frames=3, window_frames=3, context_pass=False,
        rope_reset_frames=50, sink_refresh_threshold=0.2,
    ),
    # LongLive-1.0 `longlive_inference.yaml`: local_attn_size 12 with a 3-frame global sink.
    "longlive": CachePolicy(
        "longlive", sink_frames=3, window_frames=9, recache_on_prompt_switch=True,
    ),
}
