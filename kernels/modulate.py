"""adaLN: parameter-free LayerNorm fused with per-frame modulation, `norm(x) * (1 + scale) + shift`.

WanBlock does this twice per block (norm1 before self-attention, norm2 before the FFN) and the head
once, each in float32 over the whole residual stream: in eager torch that is a LayerNorm pass, a
broadcast multiply and an add, three reads and writes of [B, F*T, D] float32. The kernel reads x
once and writes the modulated row once, optionally directly in the dtype of the next linear layer.

Tokens are frame-major ([B, F*T, D], T tokens per frame); shift/scale are per frame ([B, F, D]),
which is what lets frames at different noise levels share one forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

__all__ = ["adaln_modulate", "adaln_modulate_ref", "adaln_modulate_triton"]


def adaln_modulate_ref(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> Tensor:
    """x [B, F*T, D]; shift/scale [B, F, D] or [B, F, 1, D] -> [B, F*T, D] in `out_dtype` (x's).

    The float32 operations Wan does (`norm1(x)` per frame `* (1 + scale) + shift`).
    """
    shift, scale = frame_mod(shift, x, "shift"), frame_mod(scale, x, "scale")
    b, n, d = x.shape
    f = shift.shape[1]
    y = F.layer_norm(x.float(), (d,), eps=eps).view(b, f, n // f, d)
    y = y * (1 + scale.float()) + shift.float()
    return y.view(b, n, d).to(out_dtype or x.dtype)


@triton_kernel
def _adaln_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    rows, n_tok, tok_per_frame, dim, eps,
    sx_b, sx_n, ss_b, ss_f, sc_b, sc_f,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program normalises BLOCK_M token rows; the whole row sits in registers (D <= 8192).
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    rmask = r < rows
    cmask = c < dim
    m = rmask[:, None] & cmask[None, :]
    # int64 offsets: a 14B-model tensor can pass 2^31 elements.
    b = (r // n_tok).to(tl.int64)
    n = (r % n_tok).to(tl.int64)
    f = n // tok_per_frame
    x = tl.load(x_ptr + (b * sx_b + n * sx_n)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / dim
    xc = tl.where(m, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / dim
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
    sh = tl.load(shift_ptr + (b * ss_b + f * ss_f)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + (b * sc_b + f * sc_f)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    y = y * (1.0 + sc) + sh
    tl.store(out_ptr + r.to(tl.int64)[:, None] * dim + c[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def adaln_modulate_triton(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> Tensor:
    shift, scale = per_frame(shift, x, "shift"), per_frame(scale, x, "scale")
    b, n, d = x.shape
    f = shift.shape[1]
    # The kernel indexes the feature axis with unit stride; everything else goes through strides,
    # so WanBlock's chunked [B, F, 1, D] modulation views are read in place.
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    out = torch.empty((b, n, d), dtype=out_dtype or x.dtype, device=x.device)
    block_d = next_pow2(d)
    block_m = max(1, min(16, 8192 // block_d))
    rows = b * n
    _adaln_kernel[(cdiv(rows, block_m),)](
        x, shift, scale, out,
        rows, n, n // f, d, eps,
        x.stride(0), x.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps_for(block_m * block_d),
    )
    return out


def adaln_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Dispatcher: `adaln_modulate_triton` on CUDA (or when forced), else `adaln_modulate_ref`."""
    triton = use_triton(x, shift, scale, kernel="adaln_modulate")
    impl = adaln_modulate_triton if triton else adaln_modulate_ref
    return impl(x, shift, scale, eps, out_dtype)

