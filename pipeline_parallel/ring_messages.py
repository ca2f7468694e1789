"""The vocabulary of a pipeline's ring: tags, the replies that reach the driver, and the host
encodings of texts and layer ranges carried as tensors (the transport moves tensors only)."""

from __future__ import annotations

import torch
from torch import Tensor

RING_TAG = 0  # the ring's messages: driver -> stage 0 -> ... -> last rank -> driver
MOVE_TAG = 1  # layers (weights and K/V) moved between stages by a rebalance
ANSWERED = ("forward", "error", "rebalanced", "pong", "stopped")  # what reaches the driver


def encode_text(text: str) -> Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def decode_text(t: Tensor) -> str:
    return bytes(t.tolist()).decode(errors="replace")


def ranges_tensor(ranges: list[range]) -> Tensor:
    return torch.tensor([[r.start, r.stop] for r in ranges], dtype=torch.long)


def ranges_of(t: Tensor) -> list[range]:
    return [range(a, b) for a, b in t.tolist()]
