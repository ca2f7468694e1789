"""Per-session tensors and counters a worker holds for one live stream."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rollcast.workers.prompt_kv import PromptHandle


class Work(enum.Enum):
    """What a session's next forward is."""

    DENOISE = "denoise"  # one denoising step of the current block
    CONTEXT = "context"  # Self-Forcing clean pass: the finished block again at t=0
    RECACHE = "recache"  # LongLive: the cached frames again at t=0 with the new prompt


@dataclass
class BlockInput:
    """Video-to-video input for one block: the encoded input latents [C, F, h, w] and how much
    noise to mix in (σ = noise_scale) and at which timestep denoising starts."""

    latents: Tensor
    noise_scale: float
    timestep: float


@dataclass
class StreamState:
    session_id: str
    row: int  # KV cache pool row
    prompt: PromptHandle
    generator: torch.Generator
    timesteps: list[float]
    frames_done: int = 0  # latent frames finished and committed to the cache
    rope_next: int = 0  # RoPE position of the next block's first frame (baked policies)
    step: int = 0  # next denoising step of the current block
    block_rope_start: int = 0
    latent: Tensor | None = None  # x_t of the current block [C, F, h, w]; x0 before CONTEXT
    # Changes that take effect at the next block boundary, so a block never mixes prompts.
    pending_prompt: PromptHandle | None = None
    pending_timesteps: list[float] | None = None
    recache_pending: bool = False
    # RoPE position of the frame in each cache slot (host copy, for re-caching).
    slot_rope: list[int] = field(default_factory=list)
    # Clean latents by cache slot [C, capacity, h, w]; only kept by re-caching policies.
    clean: Tensor | None = None
    # Video-to-video: each block starts from the next queued input instead of pure noise.
    v2v: bool = False
    inputs: deque[BlockInput] = field(default_factory=deque)
    closed: bool = False
    # Whether this state's finished blocks are the stream's output (a stream-batched session's
    # earlier lanes hand theirs on instead), and the frames a decoding DiT made of the last one.
    decode_output: bool = True
    decoded: np.ndarray | None = None

    @property
    def next_work(self) -> Work:
        if self.recache_pending:
            return Work.RECACHE
        if self.step == len(self.timesteps):
            return Work.CONTEXT
        return Work.DENOISE

    @property
    def ready(self) -> bool:
        """Whether the next forward can run now (a v2v block waits for its input)."""
        return not self.v2v or self.in_block or self.recache_pending or bool(self.inputs)

    @property
    def in_block(self) -> bool:
        """A block has started (its latent exists) and not yet been committed to the cache."""
        return self.latent is not None
