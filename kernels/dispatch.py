"""Which implementation a kernel call runs: the Triton kernel or its pure-torch reference.

`ROLLCAST_KERNELS` (read here and nowhere else, at every call, so tests and `bench` can flip it):

- `auto` (default): Triton on CUDA tensors when triton is installed and the kernel is switched on
  in `GPU_ENABLED`, the torch reference elsewhere.
- `torch`: always the reference.
- `triton`: always the Triton kernel, whatever `GPU_ENABLED` says. On CPU tensors that only works
  in Triton's interpreter, which Triton fixes when it is first imported: `TRITON_INTERPRET=1` must
  be set before any `import triton` in the process (its own `tl.sum`, `tl.max`, ... are decorated
  then, as are the kernels here). Tests use this to exercise the kernels without a GPU.

Importing this module never needs triton: without it the references run and a forced Triton call
fails with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

__all__ = ["ENV_VAR", "GPU_ENABLED", "KernelMode", "interpreting", "kernel_mode", "tl", "triton_kernel",
           "use_triton"]

ENV_VAR = "ROLLCAST_KERNELS"
KernelMode = Literal["auto", "triton", "torch"]
_MODES: tuple[KernelMode, ...] = ("auto", "triton", "torch")

# Which kernels `auto` runs on CUDA tensors; a kernel switched off here runs its torch reference
# even on a GPU (forced `triton` still runs it). The one place to turn a kernel on or off.
# UNMEASURED DEFAULTS: every kernel is on because each saves whole-tensor memory passes on paper,
# but none has been timed against eager torch on a GPU yet. Set these from `rollcast bench
# --kernels` (`bench_kernels()` in kernels/microbench.py: speedup vs eager and vs torch.compile)
# on the target GPU, switch off any kernel that is not faster, and record the figures in
# docs/benchmarking.md.
GPU_ENABLED: dict[str, bool] = {
    "adaln_modulate": True,
    "gated_residual": True,
    "qk_norm_rope": True,
    "kv_cache_write": True,
    "fp8_quantize": True,
    "fp8_dequantize": True,
}


def kernel_mode() -> KernelMode:
    """The kernel choice from the environment (default `auto`)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode  # type: ignore[return-value]


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether triton was imported in interpreter mode (then every kernel runs on CPU via numpy)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    # Checked on Triton's own library rather than the environment: what counts is the mode
    # triton was imported in, not the variable's value now.
    return isinstance(tl.sum, InterpretedFunction)


def use_triton(*tensors: Tensor, kernel: str | None = None) -> bool:
    """Whether a call of `kernel` (a `GPU_ENABLED` key) on `tensors` runs the Triton kernel (see
    the module docstring)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        # A name missing from the table is a typo in a dispatcher: fail loudly, not silently off.
        enabled = kernel is None or GPU_ENABLED[kernel]
        return on_cuda and enabled and triton_available()
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"{ENV_VAR}=triton on CPU tensors needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return True


class _NoTriton:
    """Stands in for a kernel when triton is not installed; launching it explains why it cannot."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        raise RuntimeError(f"Triton kernel {self.fn.__name__} needs triton installed")


def triton_kernel(fn: Callable[..., None]) -> Any:
    """`triton.jit` when triton is installed (compiled or interpreted as triton was imported)."""
    return triton.jit(fn) if triton is not None else _NoTriton(fn)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warps_for(elements: int) -> int:
    """num_warps for a program holding `elements` fp32 values: about 16 per thread, no spills."""
    return max(1, min(16, next_pow2(elements // 512)))


def frame_mod(t: Tensor, x: Tensor, what: str) -> Tensor:
    """Per-frame modulation for tokens x [B, F*T, D], as [B, F, 1, D] (a view, never a copy): the
    shape that broadcasts over a frame's tokens, so the references index nothing more per call.

    Accepts [B, F, D] or WanBlock's chunk shape [B, F, 1, D]; a batch of 1 broadcasts.
    """
    b, n, d = x.shape
    if t.dim() == 3:
        t = t[:, :, None]
    if (t.dim() != 4 or t.shape[2] != 1 or t.shape[0] not in (1, b) or t.shape[3] != d
            or t.shape[1] < 1 or n % t.shape[1]):
        raise ValueError(f"{what} must be [B, F, {d}] or [B, F, 1, {d}] with F dividing {n} tokens, "
                         f"got {tuple(t.shape)}")
    return t


def per_frame(t: Tensor, x: Tensor, what: str) -> Tensor:
    """Per-frame modulation for tokens x [B, F*T, D], as [B, F, D] (a view, never a copy), for the
    kernels' launchers; accepts what `frame_mod` accepts."""
    t = frame_mod(t, x, what)
    return t.squeeze(2).expand(x.shape[0], t.shape[1], x.shape[2])
