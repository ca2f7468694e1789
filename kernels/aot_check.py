"""Compile every Triton kernel ahead of time for a CUDA architecture, without a GPU.

Triton's interpreter accepts programs the compiler rejects (and the reverse), so interpreter tests
alone do not show that a kernel builds for the GPU. Here each `*_triton` launcher runs on small
CPU tensors of the model's real widths with its kernel swapped for a recorder; the recorded
arguments become a signature that Triton compiles down to a cubin for `sm_<arch>` (triton bundles
ptxas). Needs triton imported in compiled mode (not `TRITON_INTERPRET=1`).

    python -m rollcast.kernels.aot_check        # prints seconds per kernel variant
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from rollcast.kernels import fp8_kv, kv_write, modulate, qk_norm, residual
from rollcast.kernels.dispatch import interpreting, triton

__all__ = ["compile_all"]

_TRITON_DTYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8e4nv",
    torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32",
}


class _Recorder:
    """Stands in for a jit kernel: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kw: self.calls.append((args, kw))


@contextmanager
def _recording(module: Any, name: str) -> Iterator[_Recorder]:
    kernel = getattr(module, name)
    rec = _Recorder(kernel)
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, kernel)


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _compile(rec: _Recorder, arch: int) -> list[float]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    times = []
    names = rec.kernel.arg_names
    constexpr_names = {names[i] for i in rec.kernel.constexprs}
    for args, kw in rec.calls:
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        values = dict(zip(names, args, strict=False)) | kw
        sig = {n: "constexpr" if n in constexpr_names else _arg_type(values[n]) for n in names}
        constexprs = {n: values[n] for n in constexpr_names}
        start = time.perf_counter()
        triton.compile(ASTSource(rec.kernel, sig, constexprs=constexprs),
                       target=GPUTarget("cuda", arch, 32), options=options)
        times.append(time.perf_counter() - start)
    return times


def _launch_all(dim: int, heads: int, dtype: torch.dtype) -> dict[tuple[Any, str], Callable[[], object]]:
    """Each launcher on CPU tensors with the model's widths (few tokens), every flag combination."""
    hd = dim // heads
    b, f, t = 2, 2, 3
    x = torch.randn(b, f * t, dim)
    mod = torch.randn(b, f, 6, dim)
    lin = torch.randn(b, f * t, dim).to(dtype)
    w = torch.ones(dim)
    cos = sin = torch.ones(b, f * t, 1, hd // 2)
    kv = torch.randn(b, f * t, heads, hd).to(dtype)
    q8, s8 = fp8_kv.fp8_quantize_ref(kv)
    cap = 4
    caches = {d: torch.zeros(3, cap * t, heads, hd, dtype=d) for d in (dtype, fp8_kv.FP8_DTYPE)}
    scales = torch.zeros(3, cap * t, heads)
    rows, frames = torch.tensor([2, 0]), torch.tensor([[4, 5], [1, 2]])

    def write(cache: torch.Tensor, slots: torch.Tensor | None = None) -> Callable[[], object]:
        sc = (scales, scales.clone()) if cache.dtype == fp8_kv.FP8_DTYPE else (None, None)
        return lambda: kv_write.kv_cache_write_triton(
            cache, cache.clone(), torch.full((3, cap), -1), kv, kv, rows, frames, sink=1, window=3,
            slots=slots, k_scale=sc[0], v_scale=sc[1])

    return {
        (modulate, "_adaln_kernel"): lambda: (
            modulate.adaln_modulate_triton(x, mod[:, :, 0:1], mod[:, :, 1:2], 1e-6, dtype),
            modulate.adaln_modulate_triton(x, mod[:, :, 0:1], mod[:, :, 1:2], 1e-6)),
        (residual, "_gated_residual_kernel"): lambda: residual.gated_residual_triton(x, x, mod[:, :, 2:3]),
        (qk_norm, "_qk_norm_rope_kernel"): lambda: (
            qk_norm.qk_norm_rope_triton(lin, w, cos, sin, num_heads=heads),
            qk_norm.qk_norm_rope_triton(lin, w, None, None, num_heads=heads),
            qk_norm.qk_norm_rope_triton(kv, None, cos, sin, num_heads=heads)),
        (kv_write, "_ring_write_kernel"): lambda: (
            write(caches[dtype])(), write(caches[fp8_kv.FP8_DTYPE])(), write(caches[dtype], frames)()),
        (fp8_kv, "_quantize_kernel"): lambda: fp8_kv.fp8_quantize_triton(kv),
        (fp8_kv, "_dequantize_kernel"): lambda: fp8_kv.fp8_dequantize_triton(q8, s8, dtype),
    }


def compile_all(
    arch: int = 90, *, dim: int = 1536, heads: int = 12, dtype: torch.dtype = torch.bfloat16
) -> dict[str, list[float]]:
    """Compile every kernel variant the launchers use for sm_`arch`; seconds per variant by kernel.

    Raises whatever Triton raises for a kernel that does not compile.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if interpreting():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: the kernels are interpreted")
    out: dict[str, list[float]] = {}
    for (module, name), launch in _launch_all(dim, heads, dtype).items():
        # fp8 cache writes quantise first: that kernel is stubbed too (it is compiled on its own).
        keys = {(module, name), (fp8_kv, "_quantize_kernel")}
        with ExitStack() as stack:
            recs = {key: stack.enter_context(_recording(*key)) for key in keys}
            launch()
        out[name] = _compile(recs[(module, name)], arch)
    return out


if __name__ == "__main__":
    for kernel, seconds in compile_all().items():
        print(f"{kernel}: {len(seconds)} variants, {sum(seconds):.1f} s")
