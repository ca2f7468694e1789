"""`GPU_ENABLED` (kernels/dispatch.py): a kernel switched off there runs its reference even on CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollcast.kernels import dispatch


def test_gpu_table_gates_auto_mode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors only need `is_cuda` here; a stand-in for triton makes the test independent of the host.
    cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(dispatch, "triton", object())
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert set(dispatch.GPU_ENABLED) == {"adaln_modulate", "gated_residual", "qk_norm_rope", "kv_cache_write",
                                         "fp8_quantize", "fp8_dequantize"}
    assert dispatch.use_triton(cuda, kernel="adaln_modulate")  # type: ignore[arg-type]
    monkeypatch.setitem(dispatch.GPU_ENABLED, "adaln_modulate", False)
    assert not dispatch.use_triton(cuda, kernel="adaln_modulate")  # type: ignore[arg-type]
    assert dispatch.use_triton(cuda, kernel="gated_residual")  # type: ignore[arg-type]
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # forcing ignores the table (tests, benchmarks)
    assert dispatch.use_triton(cuda, kernel="adaln_modulate")  # type: ignore[arg-type]
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    with pytest.raises(KeyError):
        dispatch.use_triton(cuda, kernel="adaln_modulat")  # type: ignore[arg-type]
