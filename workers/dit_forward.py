"""Where the DiT's layers run: in this process (`LocalDiT`) or across pipeline stages.

The block runner (`block_runner.py`) owns every session's state machine: latents, noise, sampler
steps, cache positions. What it needs from the model is one thing: a forward of a micro-batch of
latents at per-frame timesteps that writes the given frames into each session's KV cache row and
returns the clean-latent estimate x0 = x - σ·v of the flow prediction v (the sampler's x0 step runs
where the head does: on a pipeline's last stage). `DiTForward` is that seam. A staged one may also
decode finished blocks to frames where x0 comes out (`decodes`), so the VAE runs on the last
stage or a dedicated decode stage instead of on the driver. A forward is *launched* and its result
*waited for* separately, so a pipeline-parallel implementation (`rollcast.pipeline_parallel`)
can hold as many micro-batches in flight as it has stages; the local one computes on `wait`.

`KVWrite` is the whole host-side description of a forward's cache traffic. It is what crosses
stage boundaries besides the activations: each stage turns it into a `KVBatch` of its own pool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor

from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.prompt_kv import PromptBatch, PromptHandle, PromptKV
from rollcast.workers.sampler import FlowMatchSampler


@dataclass(frozen=True)
class KVWrite:
    """Which latent frames of which cache rows one forward writes, at which RoPE positions."""

    rows: list[int]
    frames: list[list[int]]
    rope_positions: list[list[int]]
    new_block: list[bool]
    grid_hw: tuple[int, int]


@dataclass
class ForwardOutput:
    """x0 [B, C, F, h, w] of a forward, and the decoded frames (uint8 [T, H, W, 3]) of the samples
    it was asked to decode (None for the others, and for all when the DiT does not decode)."""

    x0: Tensor
    frames: list[np.ndarray | None]


class ForwardHandle(Protocol):
    def wait(self) -> ForwardOutput: ...


class DiTForward(Protocol):
    config: ModelConfig
    # Row allocation and cache layout. For staged runs the driver holds a pool without layers
    # (no memory): the stages hold the K/V, each for its own layers.
    pool: KVCachePool
    depth: int  # forwards that may be in flight at once (launched and not yet waited for)
    kv_bytes: int  # K/V memory of every layer, wherever it lives
    decodes: bool  # whether `launch` honours `decode_rows` (else the caller decodes x0 itself)
    # Whether the layers (and their K/V) live elsewhere and can be lost with a stage: the runner
    # then keeps each session's clean latents, to re-fill a rebuilt pipeline's caches from them.
    remote: bool

    def prompt_kv(self, embedding: Tensor) -> PromptHandle:
        """What the runner hands back to `launch` for a prompt (text embedding [L, text_dim])."""
        ...

    def opened(self, row: int) -> None:
        """A session took cache row `row` (the runner allocated it from `pool`); a decoding DiT
        starts a fresh VAE decode stream on it."""
        ...

    def released(self, row: int) -> None: ...

    def launch(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle], write: KVWrite,
               sigma: Tensor, decode_rows: Sequence[int]) -> ForwardHandle:
        """One forward of latents x [B, C, F, h, w] at timesteps t [B, F]; σ [B] of each sample's
        step gives x0; `decode_rows[i]` >= 0 asks for sample i's x0 decoded on that row's stream."""
        ...

    def rebalance_plan(self) -> list[range] | None:
        """Layer ranges the stages should move to once nothing is in flight (None: stay)."""
        ...

    def rebalance(self, ranges: list[range]) -> None: ...

    def close(self) -> None:
        """Stop whatever runs the layers elsewhere."""
        ...


@dataclass(frozen=True)
class _Deferred:
    """A local forward, computed when its result is asked for."""

    compute: Callable[[], ForwardOutput]

    def wait(self) -> ForwardOutput:
        return self.compute()


class LocalDiT:
    """All layers in this process; the forward runs when its result is asked for."""

    depth = 1
    decodes = False  # the caller decodes: it runs in this process anyway
    remote = False

    def __init__(self, model: CausalWanModel, pool: KVCachePool) -> None:
        if pool.layers != model.layers:
            raise ValueError(f"KV pool covers layers {pool.layers}, the model holds {model.layers}")
        self.model = model
        self.pool = pool
        self.config = model.config

    def prompt_kv(self, embedding: Tensor) -> PromptKV:
        return self.model.prompt_kv(embedding.to(self.pool.device))

    @property
    def kv_bytes(self) -> int:
        return self.pool.nbytes

    def opened(self, row: int) -> None:
        pass  # the pool is this process's: allocating the row was all

    def released(self, row: int) -> None:
        pass

    def rebalance_plan(self) -> None:
        return None  # one stage: nothing to balance

    def rebalance(self, ranges: list[range]) -> None:
        raise ValueError("a model in one process has no stages to rebalance")

    def close(self) -> None:
        pass

    def launch(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle], write: KVWrite,
               sigma: Tensor, decode_rows: Sequence[int]) -> _Deferred:
        return _Deferred(functools.partial(self.forward, x, t, prompts, write, sigma))

    def forward(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle], write: KVWrite,
                sigma: Tensor) -> ForwardOutput:
        kv = self.pool.batch(rows=write.rows, frames=write.frames, rope_positions=write.rope_positions,
                             new_block=write.new_block, grid_hw=write.grid_hw, rope=self.model.rope)
        v = self.model(x, t, PromptBatch.stack(prompts), kv.attend)  # type: ignore[arg-type]
        return ForwardOutput(FlowMatchSampler.to_x0(x, v.to(x.dtype), sigma.view(-1, 1, 1, 1, 1)),
                             [None] * len(x))
