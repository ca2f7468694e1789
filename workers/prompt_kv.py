"""Cross-attention K/V of a prompt, computed once per prompt and reused by every block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PromptKV:
    """K/V of one prompt's text rows for the layers starting at `first_layer`.

    k, v: [num_layers, text_len, heads, head_dim]. About 94 MB per prompt for the 1.3B in bf16.
    """

    first_layer: int
    k: Tensor
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class PromptBatch:
    """The prompts of one micro-batch, stacked: k, v [num_layers, B, text_len, heads, head_dim]."""

    first_layer: int
    k: Tensor
    v: Tensor

    @classmethod
    def stack(cls, prompts: Sequence[PromptKV]) -> PromptBatch:
        first = prompts[0]
        if any(p.first_layer != first.first_layer for p in prompts):
            raise ValueError("prompts of one batch must cover the same layers")
        if all(p is first for p in prompts):  # one prompt for everyone: a view, no copy
            n = len(prompts)
            return cls(first.first_layer, first.k[:, None].expand(-1, n, -1, -1, -1),
                       first.v[:, None].expand(-1, n, -1, -1, -1))
        return cls(first.first_layer, torch.stack([p.k for p in prompts], 1),
                   torch.stack([p.v for p in prompts], 1))

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        i = layer - self.first_layer
        return self.k[i], self.v[i]


@dataclass(eq=False)
class PromptRef:
    """A prompt whose K/V live on pipeline stages, each for its own layers: the id they know it
    by. The stages drop their K/V once the driver's last reference to this object is gone."""

    prompt_id: int
    # The text embedding it was made from (kept to re-send it to a rebuilt pipeline).
    embedding: Tensor | None = field(default=None, repr=False)


# What a block runner holds per session for its prompt: the K/V themselves, or a stage reference.
PromptHandle = PromptKV | PromptRef
