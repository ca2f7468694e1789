"""q/k RMSNorm over the full model dim fused with Wan's 3-D RoPE.

Self-attention normalises q and k over all heads together (weight [dim], eps 1e-6, float32), splits
into heads and rotates adjacent pairs (2i, 2i+1) of each head by per-token angles. The frame, row
and column parts of the head dim (22 + 21 + 21 pairs at head_dim 128, see workers/rope.py) are
already laid out in the cos/sin tables `Rope3D.cos_sin` builds, so one kernel serves every
position mode of the rolling cache: baked RoPE (absolute or reset positions, `KVBatch.q_cos`) and
late RoPE (window-relative positions for every cache slot, `KVBatch.k_cos`) differ only in the
tables passed.

Either half can be switched off: `weight=None` rotates only (late RoPE applied to cached K at
attention time), `cos=None` normalises only (late-RoPE K before the cache write, cross-attention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollcast.kernels.dispatch import cdiv, next_pow2, tl, triton_kernel, use_triton, warps_for

__all__ = ["qk_norm_rope", "qk_norm_rope_ref", "qk_norm_rope_triton"]


def _shapes(x: Tensor, num_heads: int, cos: Tensor | None, sin: Tensor | None) -> tuple[int, int, int]:
    """(B, L, head_dim) of x given as [B, L, H*Dh] or [B, L, H, Dh]; checks the RoPE tables."""
    if x.dim() == 4:
        if x.shape[2] != num_heads:
            raise ValueError(f"x has {x.shape[2]} heads, expected {num_heads}")
        b, length, _, hd = x.shape
    elif x.dim() == 3 and x.shape[2] % num_heads == 0:
        b, length, hd = x.shape[0], x.shape[1], x.shape[2] // num_heads
    else:
        raise ValueError(f"x must be [B, L, H*Dh] or [B, L, H, Dh] with H={num_heads}, "
                         f"got {tuple(x.shape)}")
    if hd % 2:
        raise ValueError(f"head_dim {hd} is odd: RoPE rotates pairs")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together")
    if cos is not None and sin is not None:
        want = (b, length, 1, hd // 2)
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 4 or t.shape[1:] != want[1:] or t.shape[0] not in (1, b):
                raise ValueError(f"{name} must be [B, L, 1, head_dim/2] = {want}, got {tuple(t.shape)}")
    return b, length, hd


def qk_norm_rope_ref(
    x: Tensor,
    weight: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    *,
    num_heads: int,
    eps: float = 1e-6,
) -> Tensor:
    """x [B, L, H*Dh] (or [B, L, H, Dh]) -> [B, L, H, Dh] in x's dtype.

    RMSNorm over the full dim with `weight` [H*Dh] (skipped when None), then rotation of adjacent
    pairs by cos/sin [B, L, 1, Dh/2] (skipped when None). Same float32 operations, in the same
    order, as `RMSNorm.forward` then `apply_rope`, with one rounding to x's dtype at the end.
    """
    b, length, hd = _shapes(x, num_heads, cos, sin)
    xf = x.float()
    if weight is not None:
        xf = xf.reshape(b, length, num_heads * hd)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if xf.dim() == 3:  # (reshapes only when needed: each is a few microseconds on CPU's tiny tensors)
        xf = xf.view(b, length, num_heads, hd)
    if cos is not None and sin is not None:
        pairs = xf.unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        xf = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return xf.to(x.dtype)


@triton_kernel
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    rows, seq, half_dim, half_head, eps,
    sx_b, sx_l, sc_b, sc_l, ss_b, ss_l,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # A tile of BLOCK_M tokens x all H*Dh/2 pairs: the norm needs the whole row, RoPE needs the two
    # elements of a pair together, so even and odd elements are loaded as two [M, P] tiles.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.arange(0, BLOCK_P)
    m = (r < rows)[:, None] & (p < half_dim)[None, :]
    b = (r // seq).to(tl.int64)  # int64 offsets: a whole 14B cache passes 2^31 elements
    pos = (r % seq).to(tl.int64)
    src = x_ptr + (b * sx_b + pos * sx_l)[:, None] + 2 * p[None, :]
    x0 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        ms = tl.sum(x0 * x0 + x1 * x1, axis=1) / (2 * half_dim)
        rstd = 1.0 / tl.sqrt(ms + eps)
        w0 = tl.load(w_ptr + 2 * p, mask=p < half_dim, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + 2 * p + 1, mask=p < half_dim, other=0.0).to(tl.float32)
        x0 = x0 * rstd[:, None] * w0[None, :]
        x1 = x1 * rstd[:, None] * w1[None, :]
    if HAS_ROPE:
        # Pair p belongs to head p // half_head and uses that head's angle p % half_head.
        hp = (p % half_head)[None, :]
        c = tl.load(cos_ptr + (b * sc_b + pos * sc_l)[:, None] + hp, mask=m, other=1.0)
        s = tl.load(sin_ptr + (b * ss_b + pos * ss_l)[:, None] + hp, mask=m, other=0.0)
        y0 = x0 * c - x1 * s
        y1 = x0 * s + x1 * c
        x0, x1 = y0, y1
    dst = out_ptr + r.to(tl.int64)[:, None] * (2 * half_dim) + 2 * p[None, :]
    tl.store(dst, x0.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 1, x1.to(out_ptr.dtype.element_ty), mask=m)


def _rows_view(x: Tensor, dim: int) -> Tensor:
    """x as [B, L, dim] with unit stride inside a token (strides between tokens are free)."""
    heads_packed = x.dim() == 3 or x.stride(-2) == x.shape[-1]
    if x.stride(-1) != 1 or not heads_packed:
        x = x.contiguous()
    return x.flatten(2) if x.dim() == 4 else x


def qk_norm_rope_triton(
    x: Tensor,
    weight: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    *,
    num_heads: int,
    eps: float = 1e-6,
) -> Tensor:
    b, length, hd = _shapes(x, num_heads, cos, sin)
    dim = num_heads * hd
    xr = _rows_view(x, dim)
    if weight is not None and (weight.numel() != dim or weight.stride(-1) != 1):
        weight = weight.reshape(dim).contiguous()
    cos_t, sin_t = (None if t is None else t.expand(b, -1, -1, -1) for t in (cos, sin))
    cos_t, sin_t = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (cos_t, sin_t))
    out = torch.empty((b, length, num_heads, hd), dtype=x.dtype, device=x.device)
    block_p = next_pow2(dim // 2)
    block_m = max(1, min(16, 4096 // block_p))
    rows = b * length
    dummy = out  # stands in for absent pointers; the constexpr flags keep them unread
    _qk_norm_rope_kernel[(cdiv(rows, block_m),)](
        xr, weight if weight is not None else dummy,
        cos_t if cos_t is not None else dummy, sin_t if sin_t is not None else dummy, out,
        rows, length, dim // 2, hd // 2, eps,
        xr.stride(0), xr.stride(1),
        *(cos_t.stride(0), cos_t.stride(1)) if cos_t is not None else (0, 0),
        *(sin_t.stride(0), sin_t.stride(1)) if sin_t is not None else (0, 0),
        HAS_NORM=weight is not None, HAS_ROPE=cos_t is not None,
        BLOCK_M=block_m, BLOCK_P=block_p, num_warps=warps_for(2 * block_m * block_p),
    )
    return out


def qk_norm_rope(
    x: Tensor,
    weight: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    *,
    num_heads: int,
    eps: float = 1e-6,
) -> Tensor:
    """Dispatcher: `qk_norm_rope_triton` on CUDA (or when forced), else `qk_norm_rope_ref`."""
    impl = qk_norm_rope_triton if use_triton(x, kernel="qk_norm_rope") else qk_norm_rope_ref
    return impl(x, weight, cos, sin, num_heads=num_heads, eps=eps)
