"""Triton kernels for the hot path, each with a pure-torch reference and a dispatcher.

One concept per module; each exports `<name>` (the dispatcher), `<name>_ref` (pure torch, the
semantics) and `<name>_triton` (the kernel launcher), all with the same signature. The dispatcher
runs Triton on CUDA tensors and the reference elsewhere; `ROLLCAST_KERNELS=auto|triton|torch`
overrides that, and `GPU_ENABLED` (`dispatch.py`) switches single kernels off on GPUs. Importing
this package never needs triton.
"""

from rollcast.kernels.dispatch import ENV_VAR, GPU_ENABLED, kernel_mode, use_triton
from rollcast.kernels.fp8_kv import FP8_DTYPE, FP8_MAX, fp8_dequantize, fp8_quantize
from rollcast.kernels.kv_write import kv_cache_write, ring_slots
from rollcast.kernels.modulate import adaln_modulate
from rollcast.kernels.qk_norm import qk_norm_rope
from rollcast.kernels.residual import gated_residual

__all__ = [
    "ENV_VAR",
    "FP8_DTYPE",
    "FP8_MAX",
    "GPU_ENABLED",
    "adaln_modulate",
    "fp8_dequantize",
    "fp8_quantize",
    "gated_residual",
    "kernel_mode",
    "kv_cache_write",
    "qk_norm_rope",
    "ring_slots",
    "use_triton",
]
