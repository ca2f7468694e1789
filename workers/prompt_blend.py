"""Mixing prompt embeddings: weighted blends and timed transitions between prompts.

Embeddings are the encoder's [text_len, text_dim] outputs (rows past a prompt's tokens are
zero). Both operations work per token row, in float32 (or wider), and return the inputs' dtype.

- `linear`: the weighted sum. Mixing two unrelated rows shrinks their norm (by up to 1/√2 for
  orthogonal rows of equal norm), which the DiT sees as a weaker condition mid-blend.
- `slerp`: per row, the direction moves along the great circle between the two rows while the
  norm is interpolated linearly, so rows of equal norm keep it. Rows that are zero (padding) or
  (anti)parallel fall back to `linear`; in particular rows zero in both inputs stay exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

BlendMethod = Literal["linear", "slerp"]
BLEND_METHODS: tuple[str, ...] = ("linear", "slerp")

# Below this row norm a row counts as zero (padding), below this sin(angle) as parallel.
_ZERO_NORM = 1e-12
_PARALLEL_SIN = 1e-3  # fp32 acos near ±1 is only good to ~5e-4 rad


def _check_method(method: str) -> None:
    if method not in BLEND_METHODS:
        raise ValueError(f"unknown blend method {method!r}; methods: {BLEND_METHODS}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _slerp_rows(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Slerp of every last-dim row of `a` towards `b` by `t`, in the inputs' (float) dtype."""
    na = a.norm(dim=-1, keepdim=True)
    nb = b.norm(dim=-1, keepdim=True)
    ua = a / na.clamp_min(_ZERO_NORM)
    ub = b / nb.clamp_min(_ZERO_NORM)
    theta = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0).acos()
    sin = theta.sin()
    safe_sin = sin.clamp_min(_PARALLEL_SIN)
    direction = (torch.sin((1 - t) * theta) / safe_sin) * ua + (torch.sin(t * theta) / safe_sin) * ub
    spherical = ((1 - t) * na + t * nb) * direction
    linear = (1 - t) * a + t * b
    fallback = (na <= _ZERO_NORM) | (nb <= _ZERO_NORM) | (sin < _PARALLEL_SIN)
    return torch.where(fallback, linear, spherical)


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Row-wise spherical interpolation from `a` (t=0, returned exactly) to `b` (t=1, exactly)."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    dtype = torch.promote_types(a.dtype, b.dtype)
    cd = _compute_dtype(dtype)
    return _slerp_rows(a.to(cd), b.to(cd), t).to(dtype)


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum 1; negative, non-finite or all-zero weights are an error."""
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("no weights given")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {w}")
    return [x / total for x in w]


def blend(embeddings: Sequence[Tensor], weights: Sequence[float],
          method: BlendMethod = "linear") -> Tensor:
    """Weighted mix of prompt embeddings of one shape; weights are normalised to sum 1.

    `slerp` with more than two embeddings is applied pairwise and cumulatively:
    acc = e0, then acc = slerp(acc, e_i, w_i / (w_0 + ... + w_i)) for i = 1, 2, ... Each step
    gives the partial mix its weight share, so for `linear` the same recursion is exactly the
    weighted sum; for `slerp` the result depends on the order of the embeddings (spherical
    interpolation is not associative).
    """
    _check_method(method)
    if len(embeddings) != len(weights):
        raise ValueError(f"{len(embeddings)} embeddings but {len(weights)} weights")
    w = normalise_weights(weights)
    first = embeddings[0]
    for e in embeddings[1:]:
        if e.shape != first.shape:
            raise ValueError(f"embeddings differ in shape: {tuple(first.shape)} vs {tuple(e.shape)}")
        if e.device != first.device:
            raise ValueError(f"embeddings on different devices: {first.device} vs {e.device}")
    # One embedding carrying all the weight is returned exactly (no float round trip).
    if w.count(1.0) == 1 and w.count(0.0) == len(w) - 1:
        return embeddings[w.index(1.0)].clone()
    dtype = first.dtype
    for e in embeddings[1:]:
        dtype = torch.promote_types(dtype, e.dtype)
    cd = _compute_dtype(dtype)
    if method == "linear":
        out = torch.zeros(first.shape, dtype=cd, device=first.device)
        for e, x in zip(embeddings, w, strict=True):
            if x:
                out += x * e.to(cd)
        return out.to(dtype)
    acc = first.to(cd)
    seen = w[0]
    for e, x in zip(embeddings[1:], w[1:], strict=True):
        seen += x
        if x == 0.0:
            continue
        t = min(1.0, x / seen)
        acc = e.to(cd) if t == 1.0 else _slerp_rows(acc, e.to(cd), t)
    return acc.to(dtype)


@dataclass(frozen=True, eq=False)
class PromptTransition:
    """A prompt switch spread over `blocks` generated blocks.

    Convention: `k` counts blocks generated after the switch, from 0. Block k uses
    t = (k + 1) / (blocks + 1) of the way from `start` to `end`, so k = 0 is already one step
    away from `start`, k = 0 .. blocks - 1 are the `blocks` blended blocks, and from
    k = blocks on the embedding is exactly `end` (the same tensor, not a copy) and `done(k)`.
    """

    start: Tensor
    end: Tensor
    blocks: int
    method: BlendMethod = "linear"

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.blocks <= 0:
            raise ValueError(f"a transition needs blocks >= 1, got {self.blocks}")
        if self.start.shape != self.end.shape:
            raise ValueError(f"start and end differ in shape: {tuple(self.start.shape)} vs "
                             f"{tuple(self.end.shape)}")

    def fraction(self, k: int) -> float:
        """How far block k is from `start` (0) towards `end` (1)."""
        if k < 0:
            raise ValueError(f"block index must be >= 0, got {k}")
        return min(1.0, (k + 1) / (self.blocks + 1))

    def at(self, k: int) -> Tensor:
        """The embedding for the k-th block after the switch."""
        t = self.fraction(k)
        if t >= 1.0:
            return self.end
        return blend([self.start, self.end], [1.0 - t, t], self.method)

    def done(self, k: int) -> bool:
        """Whether block k (and every later one) uses exactly `end`."""
        return k >= self.blocks
