"""CUDA microbenchmarks: each Triton kernel vs its eager torch reference vs torch.compile(reference).

`bench_kernels()` is what `rollcast bench --kernels` reports on a GPU. Shapes default to the 1.3B
model at 480x832 (dim 1536, 12 heads of 128, 1560 tokens per latent frame, 3-frame blocks, a
sink-1 + window-6 cache). Every case also reports the largest difference between the Triton and
the eager output, so a GPU run doubles as a numerics check of the compiled kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rollcast.kernels.fp8_kv import (
    fp8_dequantize_ref,
    fp8_dequantize_triton,
    fp8_quantize_ref,
    fp8_quantize_triton,
)
from rollcast.kernels.kv_write import kv_cache_write_ref, kv_cache_write_triton
from rollcast.kernels.modulate import adaln_modulate_ref, adaln_modulate_triton
from rollcast.kernels.qk_norm import qk_norm_rope_ref, qk_norm_rope_triton
from rollcast.kernels.residual import gated_residual_ref, gated_residual_triton

__all__ = ["BenchShape", "bench_kernels"]


@dataclass(frozen=True)
class BenchShape:
    batch: int = 1
    frames: int = 3
    tokens_per_frame: int = 1560
    num_heads: int = 12
    head_dim: int = 128
    sink: int = 1
    window: int = 6
    cache_rows: int = 4

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


@dataclass
class _Case:
    triton_fn: Callable[[], object]
    ref_fn: Callable[[], object]
    make_compiled: Callable[[], Callable[[], object]]
    outputs: Callable[[], tuple[Tensor, Tensor]]  # (triton, eager) results to compare


def _time_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _diffs(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Largest |a - b|, absolute and relative to the largest |b| (bf16 and e4m3 outputs are
    compared on their own scale)."""
    diff = (a.float() - b.float()).abs().max().item()
    return diff, diff / max(b.float().abs().max().item(), 1e-30)


def _cases(s: BenchShape, dtype: torch.dtype, device: str = "cuda") -> dict[str, _Case]:
    dev = torch.device(device)
    b, n, d, h, hd = s.batch, s.tokens, s.dim, s.num_heads, s.head_dim
    x = torch.randn(b, n, d, device=dev)  # the float32 residual stream
    mod = torch.randn(b, s.frames, 6, d, device=dev)
    shift, scale, gate = mod[:, :, 0:1], mod[:, :, 1:2], mod[:, :, 2:3]
    y = torch.randn(b, n, d, device=dev)
    lin = torch.randn(b, n, d, device=dev, dtype=dtype)  # a q/k linear output
    w = torch.randn(d, device=dev)
    ang = torch.rand(b, n, 1, hd // 2, device=dev) * 6.28
    cos, sin = ang.cos(), ang.sin()
    kv = torch.randn(b, n, h, hd, device=dev, dtype=dtype)
    cap = s.sink + s.window
    k_cache = torch.zeros(s.cache_rows, cap * s.tokens_per_frame, h, hd, device=dev, dtype=dtype)
    v_cache, slot_frame = k_cache.clone(), torch.full((s.cache_rows, cap), -1, device=dev)
    rows = torch.arange(b, device=dev)
    frames = (torch.arange(s.frames, device=dev) + 10)[None].expand(b, -1).contiguous()
    q8, s8 = fp8_quantize_ref(kv)

    def write(fn: Callable[..., None]) -> Callable[[], None]:
        return lambda: fn(k_cache, v_cache, slot_frame, kv, kv, rows, frames, sink=s.sink, window=s.window)

    def case(tri: Callable[[], object], ref: Callable[[], object], compiled_of: Callable[..., object],
             args: tuple[object, ...], kwargs: dict[str, object]) -> _Case:
        def make() -> Callable[[], object]:
            fn = torch.compile(compiled_of)
            return lambda: fn(*args, **kwargs)

        def outs() -> tuple[Tensor, Tensor]:
            a, e = tri(), ref()
            return (a[0], e[0]) if isinstance(a, tuple) else (a, e)  # type: ignore[return-value]

        return _Case(tri, ref, make, outs)

    def kv_outs() -> tuple[Tensor, Tensor]:
        write(kv_cache_write_triton)()
        got = k_cache.clone()
        write(kv_cache_write_ref)()
        return got, k_cache

    wkw = {"sink": s.sink, "window": s.window}
    return {
        "adaln_modulate": case(lambda: adaln_modulate_triton(x, shift, scale, 1e-6, dtype),
                               lambda: adaln_modulate_ref(x, shift, scale, 1e-6, dtype),
                               adaln_modulate_ref, (x, shift, scale, 1e-6, dtype), {}),
        "qk_norm_rope": case(lambda: qk_norm_rope_triton(lin, w, cos, sin, num_heads=h),
                             lambda: qk_norm_rope_ref(lin, w, cos, sin, num_heads=h),
                             qk_norm_rope_ref, (lin, w, cos, sin), {"num_heads": h}),
        "gated_residual": case(lambda: gated_residual_triton(x, y, gate),
                               lambda: gated_residual_ref(x, y, gate),
                               gated_residual_ref, (x, y, gate), {}),
        "kv_cache_write": _Case(write(kv_cache_write_triton), write(kv_cache_write_ref),
                                lambda: _compiled_write(k_cache, v_cache, slot_frame, kv, rows, frames, wkw),
                                kv_outs),
        "fp8_quantize": case(lambda: fp8_quantize_triton(kv), lambda: fp8_quantize_ref(kv),
                             fp8_quantize_ref, (kv,), {}),
        "fp8_dequantize": case(lambda: fp8_dequantize_triton(q8, s8, dtype),
                               lambda: fp8_dequantize_ref(q8, s8, dtype),
                               fp8_dequantize_ref, (q8, s8, dtype), {}),
    }


def _compiled_write(k_cache: Tensor, v_cache: Tensor, slot_frame: Tensor, kv: Tensor, rows: Tensor,
                    frames: Tensor, kw: dict[str, int]) -> Callable[[], object]:
    fn = torch.compile(kv_cache_write_ref)
    return lambda: fn(k_cache, v_cache, slot_frame, kv, kv, rows, frames, **kw)


def bench_kernels(
    shape: BenchShape | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 50,
    warmup: int = 10,
    compile_reference: bool = True,
    only: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Per kernel: triton_ms, eager_ms, compiled_ms (NaN if not compiled or compile failed),
    the speedups over both, and max_abs_diff / max_rel_diff between the Triton and eager outputs.

    Raises RuntimeError without CUDA (the timings would mean nothing on the interpreter).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("kernel microbenchmarks need a CUDA device")
    s = shape or BenchShape()
    results: dict[str, dict[str, float]] = {}
    for name, c in _cases(s, dtype).items():
        if only is not None and name not in only:
            continue
        diff, rel = _diffs(*c.outputs())
        tri = _time_ms(c.triton_fn, iters, warmup)
        eager = _time_ms(c.ref_fn, iters, warmup)
        compiled = float("nan")
        if compile_reference:
            try:
                compiled = _time_ms(c.make_compiled(), iters, warmup)
            except Exception:  # a compile failure is a result to report, not a reason to stop
                compiled = float("nan")
        results[name] = {
            "triton_ms": tri,
            "eager_ms": eager,
            "compiled_ms": compiled,
            "speedup_vs_eager": eager / tri,
            "speedup_vs_compiled": compiled / tri,
            "max_abs_diff": diff,
            "max_rel_diff": rel,
        }
    return results
