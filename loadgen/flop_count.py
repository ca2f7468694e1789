"""Exact FLOP counts of the engine's pieces, and the peak FLOP/s they are compared against.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention;
2 FLOPs per multiply-accumulate; elementwise work, norms and softmax count as 0, as in every MFU
convention). Torch registers the attention formula only for the CUDA kernels, so the CPU fused
kernel (`_scaled_dot_product_flash_attention_for_cpu`) is added here: without it a CPU count
silently drops every attention core.

Peak FLOP/s: dense (no sparsity) spec-sheet numbers for known GPUs, else measured with a few large
matmuls on the device (best of several), else the `--peak-tflops` flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

# Dense TFLOP/s by (a substring of) `torch.cuda.get_device_name`: (bf16/fp16 tensor core, fp32).
# The more specific names come first ("H100 PCIe" before "H100"). fp32 None: not on the sheet.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),  # SXM
    ("H200", 989.4, 66.9),
    ("H800", 989.4, 66.9),
    ("GH200", 989.4, 66.9),
    ("B200", 2250.0, None),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
)


@dataclass(frozen=True)
class Peak:
    tflops: float
    source: str  # "spec:<device name>" | "measured_matmul" | "flag"


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running `fn` once (it runs for real)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def spec_peak(device_name: str, dtype: torch.dtype) -> Peak | None:
    """The table's dense peak for this GPU and dtype, or None when the GPU or number is unknown."""
    for key, half, fp32 in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            tf = fp32 if dtype == torch.float32 else half
            return Peak(tf, f"spec:{device_name}") if tf is not None else None
    return None


def measure_peak(device: torch.device, dtype: torch.dtype, *, size: int | None = None,
                 repeats: int = 5) -> Peak:
    """Best-of-`repeats` FLOP/s of a square matmul (2048 on CPU, 8192 on GPU) in `dtype`; smaller
    CPU matmuls stay well under the cores' rate (threading overhead), so MFU would read high."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pools, cuBLAS handles and heuristics
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return Peak(2 * n**3 / best / 1e12, "measured_matmul")


def device_peak(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> Peak:
    if override_tflops is not None:
        return Peak(override_tflops, "flag")
    if device.type == "cuda":
        spec = spec_peak(torch.cuda.get_device_name(device), dtype)
        if spec is not None:
            return spec
    return measure_peak(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
