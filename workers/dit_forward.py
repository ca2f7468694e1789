"""Where the DiT's layers run: in this process (`LocalDiT`) or across pipeline stages.

The block runner (`block_runner.py`) owns every session's state machine: latents, noise, sampler
steps, cache positions. What it needs from the model is one thing: a forward of a micro-batch of
latents at per-frame timesteps that writes the given frames into each session's KV cache row and
returns the flow prediction. `DiTForward` is that seam. A forward is *launched* and its result
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

from torch import Tensor

from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.prompt_kv import PromptBatch, PromptHandle, PromptKV


@dataclass(frozen=True)
class KVWrite:
    """Which latent frames of which cache rows one forward writes, at which RoPE positions."""

    rows: list[int]
    frames: list[list[int]]
    rope_positions: list[list[int]]
    new_block: list[bool]
    grid_hw: tuple[int, int]


class ForwardHandle(Protocol):
    def wait(self) -> Tensor:
        """The flow prediction v [B, C, F, h, w] of the launched forward."""
        ...


class DiTForward(Protocol):
    config: ModelConfig
    # Row allocation and cache layout. For staged runs the driver holds a pool without layers
    # (no memory): the stages hold the K/V, each for its own layers.
    pool: KVCachePool
    depth: int  # forwards that may be in flight at once (launched and not yet waited for)
    kv_bytes: int  # K/V memory of every layer, wherever it lives

    def prompt_kv(self, embedding: Tensor) -> PromptHandle:
        """What the runner hands back to `launch` for a prompt (text embedding [L, text_dim])."""
        ...

    def opened(self, row: int) -> None:
        """A session took cache row `row` (the runner allocated it from `pool`)."""
        ...

    def released(self, row: int) -> None: ...

    def launch(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle],
               write: KVWrite) -> ForwardHandle: ...

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

    compute: Callable[[], Tensor]

    def wait(self) -> Tensor:
        return self.compute()


class LocalDiT:
    """All layers in this process; the forward runs when its result is asked for."""

    depth = 1

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

    def launch(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle], write: KVWrite) -> _Deferred:
        return _Deferred(functools.partial(self.forward, x, t, prompts, write))

    def forward(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle], write: KVWrite) -> Tensor:
        kv = self.pool.batch(rows=write.rows, frames=write.frames, rope_positions=write.rope_positions,
                             new_block=write.new_block, grid_hw=write.grid_hw, rope=self.model.rope)
        return self.model(x, t, PromptBatch.stack(prompts), kv.attend)  # type: ignore[arg-type]
