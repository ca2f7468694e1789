"""fp8 (e4m3, `torch.float8_e4m3fn`) KV quantisation with one float32 scale per token and head.

scale = absmax / 448 over the head dim, q = round_e4m3(x / scale): the largest element of every
(token, head) lands on e4m3's largest finite value, so each element keeps e4m3's 3-bit mantissa
(relative error <= 2^-4) unless it is 2^-6 * 448 times smaller than its head's largest (then it is
an e4m3 subnormal, absolute error <= scale * 2^-10). An all-zero head gets scale 0 and q 0, and
dequantises back to exact zeros (no 0/0).

Halving KV bytes doubles the streams per GPU where the cache binds (reference/performance.md 4:
14B at 480p with 4 per-step caches, 3 streams per H200 in bf16, 7 in fp8).

Rounding is done in float32 by the kernel itself (round-to-nearest-even onto the e4m3 grid, then an
exact conversion): GPUs convert with RTNE, Triton's CPU interpreter does not, and torch's `.to()`
does, so all three give the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollcast.kernels.dispatch import cdiv, kernel_mode, next_pow2, tl, triton_kernel, use_triton, warps_for

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "fp8_dequantize",
    "fp8_dequantize_ref",
    "fp8_dequantize_triton",
    "fp8_quantize",
    "fp8_quantize_ref",
    "fp8_quantize_triton",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def fp8_quantize_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., H, Dh] -> (q [..., H, Dh] float8_e4m3fn, scale [..., H] float32)."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = amax / FP8_MAX
    inv = torch.where(amax > 0, FP8_MAX / amax, torch.zeros_like(amax))
    q = (xf * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_dequantize_ref(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """q [..., H, Dh] float8_e4m3fn, scale [..., H] -> q * scale in `dtype`."""
    return (q.float() * scale.float()[..., None]).to(dtype)


@triton_kernel
def _quantize_kernel(
    x_ptr, q_ptr, s_ptr,
    rows, head_dim, fp8_max,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows are (token, head) pairs of a contiguous [rows, head_dim] view; one scale per row.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    rmask = r < rows
    m = rmask[:, None] & (c < head_dim)[None, :]
    offs = r.to(tl.int64)[:, None] * head_dim + c[None, :]  # a whole cache can pass 2^31
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # IEEE divisions (Triton's `/` is approximate on GPUs): the same scales and bits as torch.
    inv = tl.where(amax > 0, tl.div_rn(fp8_max, tl.where(amax > 0, amax, 1.0)), 0.0)
    y = tl.minimum(tl.maximum(x * inv[:, None], -fp8_max), fp8_max)
    # Round to nearest even on the e4m3 grid: ulp = 2^(max(exponent, -6) - 3); adding and
    # subtracting 1.5 * 2^23 ulp leaves y rounded to a multiple of ulp. The sign is put back
    # bitwise so tiny negatives stay -0 as in torch.
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    ulp = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    big = ulp * 12582912.0
    a = (tl.abs(y) + big) - big
    y = (a.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + r, tl.div_rn(amax, fp8_max), mask=rmask)


@triton_kernel
def _dequantize_kernel(
    q_ptr, s_ptr, out_ptr,
    rows, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    rmask = r < rows
    m = rmask[:, None] & (c < head_dim)[None, :]
    offs = r.to(tl.int64)[:, None] * head_dim + c[None, :]  # a whole cache can pass 2^31
    q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + r, mask=rmask, other=0.0)
    tl.store(out_ptr + offs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def _tiles(head_dim: int) -> tuple[int, int]:
    block_d = next_pow2(head_dim)
    return max(1, min(64, 4096 // block_d)), block_d


def fp8_quantize_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    xc = x.contiguous()
    head_dim = x.shape[-1]
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows = scale.numel()
    block_m, block_d = _tiles(head_dim)
    _quantize_kernel[(cdiv(rows, block_m),)](
        xc, q, scale, rows, head_dim, FP8_MAX,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps_for(block_m * block_d),
    )
    return q, scale


def fp8_dequantize_triton(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    if scale.shape != q.shape[:-1]:
        raise ValueError(f"scale must be {tuple(q.shape[:-1])}, got {tuple(scale.shape)}")
    qc, sc = q.contiguous(), scale.float().contiguous()
    head_dim = q.shape[-1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = sc.numel()
    block_m, block_d = _tiles(head_dim)
    _dequantize_kernel[(cdiv(rows, block_m),)](
        qc, sc, out, rows, head_dim,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps_for(block_m * block_d),
    )
    return out


def _use_triton_fp8(kernel: str, *tensors: Tensor) -> bool:
    """`use_triton`, except that `auto` keeps torch on GPUs older than sm89: Triton has no e4m3
    (fp8e4nv) there, while torch converts in software."""
    if not use_triton(*tensors, kernel=kernel):
        return False
    t = tensors[0]
    return not t.is_cuda or kernel_mode() == "triton" or torch.cuda.get_device_capability(t.device) >= (8, 9)


def fp8_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dispatcher: `fp8_quantize_triton` on CUDA sm89+ (or when forced), else `fp8_quantize_ref`."""
    return fp8_quantize_triton(x) if _use_triton_fp8("fp8_quantize", x) else fp8_quantize_ref(x)


def fp8_dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dispatcher: `fp8_dequantize_triton` on CUDA sm89+ (or when forced), else `fp8_dequantize_ref`."""
    impl = fp8_dequantize_triton if _use_triton_fp8("fp8_dequantize", q, scale) else fp8_dequantize_ref
    return impl(q, scale, dtype)
