"""Gated residual add `x + y * gate` with a per-frame gate (WanBlock's two residual updates).

Eager torch reads y, writes y * gate, reads it again with x and writes the sum; the kernel reads
x and y once and writes once, in place when `out` is x (the residual stream is not needed after).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollcast.kernels.dispatch import (
    cdiv,
    frame_mod,
    next_pow2,
    per_frame,
    tl,
    triton_kernel,
    use_triton,
    warps_for,
)

__all__ = ["gated_residual", "gated_residual_ref", "gated_residual_triton"]


def _check(x: Tensor, y: Tensor, out: Tensor | None) -> None:
    if y.shape != x.shape or x.dim() != 3:
        raise ValueError(f"x and y must both be [B, N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError("out must have x's shape and dtype")


def gated_residual_ref(x: Tensor, y: Tensor, gate: Tensor, out: Tensor | None = None) -> Tensor:
    """x, y [B, F*T, D]; gate [B, F, D] or [B, F, 1, D] -> x + y * gate in x's dtype (into `out`)."""
    _check(x, y, out)
    gate = frame_mod(gate, x, "gate")
    b, n, d = x.shape
    f = gate.shape[1]
    res = x.float() + (y.float().view(b, f, n // f, d) * gate.float()).view(b, n, d)
    if out is None:
        return res.to(x.dtype)
    return out.copy_(res)


@triton_kernel
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    rows, n_tok, tok_per_frame, dim,
    sx_b, sx_n, sy_b, sy_n, sg_b, sg_f, so_b, so_n,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A [BLOCK_M tokens, BLOCK_D features] tile; grid axis 1 walks the feature axis.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (r < rows)[:, None] & (c < dim)[None, :]
    b = (r // n_tok).to(tl.int64)  # int64 offsets: large tensors pass 2^31 elements
    n = (r % n_tok).to(tl.int64)
    f = n // tok_per_frame
    x = tl.load(x_ptr + (b * sx_b + n * sx_n)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + (b * sy_b + n * sy_n)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + (b * sg_b + f * sg_f)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    res = x + y * g
    tl.store(out_ptr + (b * so_b + n * so_n)[:, None] + c[None, :], res.to(out_ptr.dtype.element_ty), mask=m)


def gated_residual_triton(x: Tensor, y: Tensor, gate: Tensor, out: Tensor | None = None) -> Tensor:
    _check(x, y, out)
    gate = per_frame(gate, x, "gate")
    b, n, d = x.shape
    f = gate.shape[1]
    x, y, gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, y, gate))
    if out is not None and out.stride(-1) == 1:
        dst = out
    else:
        dst = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_d = min(1024, next_pow2(d))
    block_m = max(1, min(16, 4096 // block_d))
    rows = b * n
    _gated_residual_kernel[(cdiv(rows, block_m), cdiv(d, block_d))](
        x, y, gate, dst,
        rows, n, n // f, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), gate.stride(1),
        dst.stride(0), dst.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps_for(block_m * block_d),
    )
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


def gated_residual(x: Tensor, y: Tensor, gate: Tensor, out: Tensor | None = None) -> Tensor:
    """Dispatcher: `gated_residual_triton` on CUDA (or when forced), else `gated_residual_ref`."""
    impl = gated_residual_triton if use_triton(x, y, gate, kernel="gated_residual") else gated_residual_ref
    return impl(x, y, gate, out)
