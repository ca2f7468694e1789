"""Triton kernels against their torch references, the references against the model code, the
dispatcher, fp8 round-trip bounds and the microbenchmark's CUDA guard.

Without a GPU the Triton paths run in Triton's CPU interpreter, which triton fixes when it is first
imported (its own `tl.sum`, `tl.max`, ... are decorated then). So:

- on a CPU-only host where triton is not imported yet, this module sets TRITON_INTERPRET=1 before
  importing it and runs the `test_interp_*` tests in-process (nothing else can use triton without
  a GPU, so the interpreter costs the rest of the session nothing);
- otherwise (a GPU host, where interpreted triton would break compiled kernels in later tests, or
  triton already imported compiled) `test_interpreter_suite` runs the `test_interp_*` tests in a
  fresh interpreter-mode subprocess, and they skip in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from rollcast.kernels import dispatch, fp8_kv, kv_write, modulate, qk_norm, residual
from rollcast.kernels.fp8_kv import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_dequantize_ref,
    fp8_dequantize_triton,
    fp8_quantize_ref,
    fp8_quantize_triton,
)
from rollcast.kernels.kv_write import kv_cache_write_ref, kv_cache_write_triton, ring_slots
from rollcast.kernels.microbench import BenchShape, bench_kernels
from rollcast.kernels.modulate import adaln_modulate_ref, adaln_modulate_triton
from rollcast.kernels.qk_norm import qk_norm_rope_ref, qk_norm_rope_triton
from rollcast.kernels.residual import gated_residual_ref, gated_residual_triton
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.causal_wan import LayerNorm, RMSNorm
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.rope import Rope3D, apply_rope

IN_INTERPRETER = dispatch.interpreting()
# The interpreter converts float32 to bf16 by truncation, torch rounds to nearest: one bf16 ulp.
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-2}
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return BF16_TOL if dtype == torch.bfloat16 else FP32_TOL


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def interp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton path, which on CPU needs this process's triton to be the interpreter."""
    if not IN_INTERPRETER:
        pytest.skip("triton is compiled-mode in this process; test_interpreter_suite runs these")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")


# -- dispatcher -------------------------------------------------------------------------------


def test_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.kernel_mode() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, " Torch ")
    assert dispatch.kernel_mode() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        dispatch.kernel_mode()


LAUNCHERS = ["adaln_modulate_triton", "gated_residual_triton", "qk_norm_rope_triton", "kv_cache_write_triton",
             "fp8_quantize_triton", "fp8_dequantize_triton"]


def _spy_dispatchers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Swap every Triton launcher for a recorder running the reference, call every dispatcher once
    and return the launchers they chose."""
    launched: list[str] = []
    for mod, name in ((modulate, "adaln_modulate_triton"), (residual, "gated_residual_triton"),
                      (qk_norm, "qk_norm_rope_triton"), (kv_write, "kv_cache_write_triton"),
                      (fp8_kv, "fp8_quantize_triton"), (fp8_kv, "fp8_dequantize_triton")):
        ref = getattr(mod, name.replace("_triton", "_ref"))

        def spy(*args: object, _name: str = name, _ref: object = ref, **kw: object) -> object:
            launched.append(_name)
            return _ref(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(mod, name, spy)
    x = torch.randn(1, 4, 8)
    mod6 = torch.randn(1, 2, 6, 8)
    kv = torch.randn(1, 4, 2, 4)
    q, s = fp8_kv.fp8_quantize_ref(kv)
    cache = torch.zeros(1, 6, 2, 4)
    calls = [
        (modulate.adaln_modulate, (x, mod6[:, :, 0:1], mod6[:, :, 1:2])),
        (residual.gated_residual, (x, x, mod6[:, :, 2:3])),
        (lambda *a: qk_norm.qk_norm_rope(*a, num_heads=2), (x, torch.ones(8), None, None)),
        (lambda *a: kv_write.kv_cache_write(*a, sink=1, window=2),
         (cache, cache.clone(), torch.full((1, 3), -1), kv, kv, torch.tensor([0]), torch.tensor([[0, 1]]))),
        (fp8_kv.fp8_quantize, (kv,)),
        (fp8_kv.fp8_dequantize, (q, s)),
    ]
    for fn, args in calls:
        fn(*args)
    return launched


def test_auto_and_torch_modes_use_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in ("auto", "torch"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        assert not dispatch.use_triton(torch.zeros(1))
        assert _spy_dispatchers(monkeypatch) == []


def test_forced_triton_needs_the_interpreter_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    if not IN_INTERPRETER:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.use_triton(torch.zeros(1))
        return
    assert dispatch.use_triton(torch.zeros(1))
    assert _spy_dispatchers(monkeypatch) == LAUNCHERS


def test_missing_triton_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "triton", None)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="not installed"):
        dispatch.use_triton(torch.zeros(1))
    with pytest.raises(RuntimeError, match="needs triton"):
        dispatch._NoTriton(test_missing_triton_is_reported)[(1,)]


# -- references against the model code ----------------------------------------------------------


def test_adaln_reference_is_wan_block_modulation() -> None:
    b, f, t, d = 2, 3, 4, 16
    x = torch.randn(b, f * t, d, generator=gen(0))
    e0 = torch.randn(b, f, 6, d, generator=gen(1))
    shift, scale = e0[:, :, 0:1], e0[:, :, 1:2]  # WanBlock's chunk views [B, F, 1, D]
    norm = LayerNorm(d, eps=1e-6, elementwise_affine=False)
    want = (norm(x).view(b, f, t, d) * (1 + scale) + shift).view(b, f * t, d)
    assert torch.equal(adaln_modulate_ref(x, shift, scale, 1e-6), want)
    assert torch.equal(adaln_modulate_ref(x, shift.squeeze(2), scale.squeeze(2)), want)


def test_qk_norm_rope_reference_is_rmsnorm_then_rope() -> None:
    b, length, h, hd = 2, 6, 3, 12
    x = torch.randn(b, length, h * hd, generator=gen(2))
    norm = RMSNorm(h * hd, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h * hd, generator=gen(3)))
    cos, sin = Rope3D(hd).cos_sin(torch.tensor([[0, 1], [7, 1500]]), 1, 3)
    normed = norm(x).unflatten(-1, (h, hd))
    with torch.no_grad():
        fused = qk_norm_rope_ref(x, norm.weight, cos, sin, num_heads=h)
        assert torch.equal(fused, apply_rope(normed, cos, sin))
        assert torch.equal(qk_norm_rope_ref(x, norm.weight, None, None, num_heads=h), normed)
    assert torch.equal(qk_norm_rope_ref(normed, None, cos, sin, num_heads=h), apply_rope(normed, cos, sin))


def test_gated_residual_reference() -> None:
    b, f, t, d = 2, 2, 3, 8
    x, y = torch.randn(b, f * t, d, generator=gen(4)), torch.randn(b, f * t, d, generator=gen(5))
    gate = torch.randn(b, f, 1, d, generator=gen(6))
    want = x + (y.view(b, f, t, d) * gate).view(b, f * t, d)
    assert torch.equal(gated_residual_ref(x, y, gate), want)
    out = x.clone()
    assert gated_residual_ref(out, y, gate, out=out) is out and torch.equal(out, want)


def test_ring_slots_match_pool_slot_of() -> None:
    for sink, window in ((0, 3), (1, 4), (3, 2)):
        pool = _pool(sink, window, t=1, rows=1)
        frames = torch.arange(40)
        assert ring_slots(frames, sink, window).tolist() == [pool.slot_of(f) for f in range(40)]
        # A frame past the sink never lands in a sink slot.
        assert (ring_slots(frames[sink:], sink, window) >= sink).all()


def _pool(sink: int, window: int, *, t: int, rows: int, h: int = 2, hd: int = 4,
          dtype: torch.dtype = torch.float32, threshold: float | None = None) -> KVCachePool:
    policy = CachePolicy("test", sink_frames=sink, window_frames=window, sink_refresh_threshold=threshold)
    return KVCachePool(layers=range(1), rows=rows, policy=policy, tokens_per_frame=t, num_heads=h,
                       head_dim=hd, dtype=dtype)


def _stream_writes(pool: KVCachePool, rows: list[int], n_frames: int, fpb: int, seed: int):
    """Yield (KVBatch, k, v) block by block for every row at once, as the engine does."""
    g = gen(seed)
    t, h, hd = pool.tokens_per_frame, pool.k.shape[3], pool.k.shape[4]
    for start in range(0, n_frames, fpb):
        # Rows at different stream positions in one batch.
        frames = [[start + i + r for i in range(fpb)] for r in range(len(rows))]
        kv = pool.batch(rows=rows, frames=frames, rope_positions=frames, new_block=[True] * len(rows),
                        grid_hw=(1, t), rope=Rope3D(hd))
        k = torch.randn(len(rows), fpb * t, h, hd, generator=g)
        yield kv, k, torch.randn(k.shape, generator=g)


def test_kv_write_reference_matches_kv_batch_write() -> None:
    sink, window, t = 1, 3, 2
    pool = _pool(sink, window, t=t, rows=3)
    rows = [pool.allocate() for _ in range(2)][::-1]  # not in row order
    mine = (pool.k[0].clone(), pool.v[0].clone(), pool.slot_frame[0].clone())
    sink_after_first: torch.Tensor | None = None
    for kv, k, v in _stream_writes(pool, rows, 9, 2, seed=7):
        kv._write(0, k, v)
        kv_cache_write_ref(*mine, k, v, kv.rows, kv.write_frame, sink=sink, window=window)
        assert torch.equal(mine[0], pool.k[0]) and torch.equal(mine[1], pool.v[0])
        assert torch.equal(mine[2], pool.slot_frame[0])
        if sink_after_first is None:
            sink_after_first = pool.k[0, :, : sink * t].clone()
    # The sink keeps the first frame of each row after the window has wrapped.
    assert sink_after_first is not None and torch.equal(pool.k[0, :, : sink * t], sink_after_first)


# -- fp8 round trip (reference; the kernel is compared bit for bit below) ---------------------------


def _check_fp8_round_trip(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    xf = x.float()
    amax = xf.abs().amax(-1)
    torch.testing.assert_close(scale, amax / FP8_MAX, rtol=0, atol=0)
    back = fp8_dequantize_ref(q, scale, torch.float32)
    err = (back - xf).abs()
    # e4m3: 3 mantissa bits, so RTNE is within 2^-4 relative for normals; below 2^-6 (subnormals,
    # elements 2^-6 * 448 times smaller than their head's largest) the step is 2^-9 in q units.
    # (2^-20: float32 rounding of the scale and inverse scale products.)
    rel = 2.0**-4 + 2.0**-20
    bound = xf.abs() * rel + scale[..., None] * 2.0**-10 * (1 + 2.0**-20)
    assert (err <= bound).all(), (err / bound.clamp_min(1e-30)).max()
    normal = xf.abs() >= scale[..., None] * 2.0**-6
    assert (err[normal] <= xf.abs()[normal] * rel).all()
    assert (back[xf == 0] == 0).all()  # exact zeros stay zeros
    # Each head's largest element sits on e4m3's largest finite value.
    assert torch.equal(q.float().abs().amax(-1)[amax > 0], torch.full_like(amax[amax > 0], FP8_MAX))


def _fp8_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = gen(seed)
    # Values over many decades, so subnormals, normals and the clamp are all exercised.
    x = torch.randn(shape, generator=g) * 10 ** (torch.rand(shape, generator=g) * 6 - 3)
    x[0, 0] = 0  # all-zero heads
    x[-1, -1, :, : shape[-1] // 2] = 0  # zeros inside a non-zero head
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_reference_round_trip_bounds(dtype: torch.dtype) -> None:
    x = _fp8_input((2, 7, 3, 20), dtype, seed=8)
    q, scale = fp8_quantize_ref(x)
    _check_fp8_round_trip(x, q, scale)
    assert (scale[0, 0] == 0).all() and (q[0, 0].float() == 0).all()
    back = fp8_dequantize_ref(q, scale)
    assert back.dtype == torch.bfloat16 and (back[0, 0] == 0).all()


# -- microbenchmark -------------------------------------------------------------------------------


def test_microbench_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_microbench_runs_on_gpu covers it")
    with pytest.raises(RuntimeError, match="CUDA"):
        bench_kernels()


@pytest.mark.gpu
def test_microbench_runs_on_gpu() -> None:
    shape = BenchShape(frames=2, tokens_per_frame=100, num_heads=4, head_dim=64, window=3)
    res = bench_kernels(shape, iters=2, warmup=1, compile_reference=False)
    assert set(res) == {"adaln_modulate", "qk_norm_rope", "gated_residual", "kv_cache_write",
                        "fp8_quantize", "fp8_dequantize"}
    for name, r in res.items():
        assert r["triton_ms"] > 0 and r["eager_ms"] > 0, name
        assert r["max_rel_diff"] < 1e-2, (name, r)  # a bf16 ulp or two; fp8 is bit-exact


# -- Triton kernels (interpreter on CPU) ---------------------------------------------------------


def test_interpreter_suite() -> None:
    """Run the `test_interp_*` tests where triton was imported in interpreter mode."""
    if IN_INTERPRETER:
        pytest.skip("triton is the interpreter in this process: the tests ran in-process")
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the child is the CPU-only case: it imports triton interpreted
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-k", "test_interp_",
         "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20 and not re.search(r"\d+ skipped", out), out[-3000:]


def test_kernels_compile_for_h200(tmp_path: Path) -> None:
    """Every kernel variant the launchers use compiles to a cubin for sm_90, no GPU needed (the
    interpreter accepts programs the compiler rejects). A subprocess: triton must be compiled-mode."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice about the default
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # not the user's ~/.triton
    code = ("from rollcast.kernels.aot_check import compile_all; "
            "print({k: len(v) for k, v in compile_all(90).items()})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=False, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "'_ring_write_kernel': 8" in proc.stdout and "'_quantize_kernel': 1" in proc.stdout, proc.stdout


ADALN_SHAPES = [(1, 1, 4, 16), (2, 3, 5, 48), (2, 2, 7, 200)]  # (B, F, T, D); D is never a power of 2 but one


@pytest.mark.parametrize(("b", "f", "t", "d"), ADALN_SHAPES)
@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, None)])
def test_interp_adaln_modulate(interp: None, b: int, f: int, t: int, d: int, dtype: torch.dtype,
                               out_dtype: torch.dtype | None) -> None:
    x = (torch.randn(b, f * t, d, generator=gen(10)) * 3 + 1).to(dtype)
    e0 = torch.randn(b, f, 6, d, generator=gen(11))
    shift, scale = e0[:, :, 0:1], e0[:, :, 1:2]
    got = adaln_modulate_triton(x, shift, scale, 1e-6, out_dtype)
    want = adaln_modulate_ref(x, shift, scale, 1e-6, out_dtype)
    assert got.dtype == want.dtype == (out_dtype or dtype)
    torch.testing.assert_close(got, want, **tol(got.dtype))
    # A batch-1 modulation broadcasts over the batch, as the dispatcher passes it.
    got1 = modulate.adaln_modulate(x, shift[:1], scale[:1], 1e-6, out_dtype)
    want1 = adaln_modulate_ref(x, shift[:1], scale[:1], 1e-6, out_dtype)
    torch.testing.assert_close(got1, want1, **tol(got.dtype))


@pytest.mark.parametrize(("b", "f", "t", "d"), ADALN_SHAPES)
@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16])
def test_interp_gated_residual(interp: None, b: int, f: int, t: int, d: int, ydtype: torch.dtype) -> None:
    x = torch.randn(b, f * t, d, generator=gen(12))
    y = torch.randn(b, f * t, d, generator=gen(13)).to(ydtype)
    gate = torch.randn(b, f, 6, d, generator=gen(14))[:, :, 2:3]
    want = gated_residual_ref(x, y, gate)
    torch.testing.assert_close(gated_residual_triton(x, y, gate), want, **FP32_TOL)
    out = x.clone()
    assert residual.gated_residual(out, y, gate, out=out) is out  # in place, as WanBlock may
    torch.testing.assert_close(out, want, **FP32_TOL)
    xb = x.bfloat16()
    want_b = gated_residual_ref(xb, y, gate)
    torch.testing.assert_close(gated_residual_triton(xb, y, gate), want_b, **BF16_TOL)


def _rope_tables(mode: str, hd: int, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """(q_cos, q_sin, k_cos, k_sin) as KVCachePool.batch builds them for a baked or late policy."""
    sink, window, fpb = 1, 3, 2
    policy = CachePolicy("t", sink_frames=sink, window_frames=window, rope=mode)  # type: ignore[arg-type]
    pool = KVCachePool(layers=range(1), rows=b, policy=policy, tokens_per_frame=t, num_heads=1, head_dim=hd)
    rows = [pool.allocate() for _ in range(b)]
    rope = Rope3D(hd)
    kv = None
    for start in (0, 2, 4, 1030):  # rows at different positions; past Wan's 1024-row table
        frames = [[start + 2 * r + i for i in range(fpb)] for r in range(b)]
        kv = pool.batch(rows=rows, frames=frames, rope_positions=frames, new_block=[True] * b,
                        grid_hw=(1, t), rope=rope)
    assert kv is not None
    k_cos, k_sin = (kv.k_cos, kv.k_sin) if mode == "late" else (kv.q_cos, kv.q_sin)
    return kv.q_cos, kv.q_sin, k_cos, k_sin  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["baked", "late"])
@pytest.mark.parametrize(("h", "hd"), [(2, 12), (3, 20)])  # 3x20: 30 pairs in a 32-wide block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_qk_norm_rope(interp: None, mode: str, h: int, hd: int, dtype: torch.dtype) -> None:
    b, t = 2, 3
    q_cos, q_sin, k_cos, k_sin = _rope_tables(mode, hd, b, t)
    length = q_cos.shape[1]
    x = torch.randn(b, length, h * hd, generator=gen(15)).to(dtype) * 2
    w = torch.randn(h * hd, generator=gen(16))
    # q (and baked k): norm + RoPE at the block's positions.
    got = qk_norm_rope_triton(x, w, q_cos, q_sin, num_heads=h)
    assert got.shape == (b, length, h, hd) and got.dtype == dtype
    torch.testing.assert_close(got, qk_norm_rope_ref(x, w, q_cos, q_sin, num_heads=h), **tol(dtype))
    # Late k: normalised only before the write, rotated over the whole cache at attention time.
    torch.testing.assert_close(qk_norm_rope_triton(x, w, None, None, num_heads=h),
                               qk_norm_rope_ref(x, w, None, None, num_heads=h), **tol(dtype))
    cache = torch.randn(b, k_cos.shape[1], h, hd, generator=gen(17)).to(dtype)
    torch.testing.assert_close(qk_norm_rope_triton(cache, None, k_cos, k_sin, num_heads=h),
                               apply_rope(cache, k_cos, k_sin), **tol(dtype))
    # Tables shared by the batch (stride-0 batch axis).
    torch.testing.assert_close(qk_norm_rope_triton(x, w, q_cos[:1], q_sin[:1], num_heads=h),
                               qk_norm_rope_ref(x, w, q_cos[:1], q_sin[:1], num_heads=h), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize(("sink", "window", "fpb"), [(1, 3, 2), (0, 2, 1), (2, 4, 3)])
def test_interp_kv_cache_write(interp: None, dtype: torch.dtype, sink: int, window: int, fpb: int) -> None:
    t, h, hd, rows_n = 3, 2, 5, 3  # odd sizes everywhere
    cap = sink + window
    fp8 = dtype == FP8_DTYPE
    mine = [torch.zeros(rows_n, cap * t, h, hd, dtype=dtype) for _ in range(2)]
    ref = [c.clone() for c in mine]
    sf_mine, sf_ref = torch.full((rows_n, cap), -1), torch.full((rows_n, cap), -1)
    sc_mine = [torch.zeros(rows_n, cap * t, h) for _ in range(2)] if fp8 else [None, None]
    sc_ref = [torch.zeros(rows_n, cap * t, h) for _ in range(2)] if fp8 else [None, None]
    rows = torch.tensor([2, 0])
    g = gen(18)
    for start in range(0, 4 * cap, fpb):  # wraps the ring several times
        frames = torch.tensor([[start + i for i in range(fpb)], [start + 1 + i for i in range(fpb)]])
        k, v = (torch.randn(2, fpb * t, h, hd, generator=g) for _ in range(2))
        kv_cache_write_triton(*mine, sf_mine, k, v, rows, frames, sink=sink, window=window,
                              k_scale=sc_mine[0], v_scale=sc_mine[1])
        kv_cache_write_ref(*ref, sf_ref, k, v, rows, frames, sink=sink, window=window,
                           k_scale=sc_ref[0], v_scale=sc_ref[1])
        assert torch.equal(sf_mine, sf_ref)
        for a, e in zip(mine, ref, strict=True):
            if fp8 or dtype == torch.float32:
                assert torch.equal(a.view(torch.uint8), e.view(torch.uint8))
            else:
                torch.testing.assert_close(a, e, **BF16_TOL)
        if fp8:
            for a, e in zip(sc_mine, sc_ref, strict=True):
                assert torch.equal(a, e)
    # The sink of the row that started at frame 0 still holds frames 0..sink-1; row 1 is unused.
    assert sf_mine[2, :sink].tolist() == list(range(sink))
    assert (sf_mine[1] == -1).all()


def test_interp_kv_cache_write_slot_override_matches_sink_refresh(interp: None) -> None:
    """With `slots` (the sink refresh decision) the kernel writes KVBatch._write's slots."""
    sink, window, t = 2, 3, 2
    pool = _pool(sink, window, t=t, rows=2, threshold=2.0)  # threshold 2: every new block refreshes
    rows = [pool.allocate() for _ in range(2)]
    mine = (pool.k[0].clone(), pool.v[0].clone(), pool.slot_frame[0].clone())
    for kv, k, v in _stream_writes(pool, rows, 6, 1, seed=19):
        slots = kv._refresh_slots(0, k, v)  # _write repeats the same decision from the same sinks
        kv._write(0, k, v)
        kv_cache_write_triton(*mine, k, v, kv.rows, kv.write_frame, sink=sink, window=window, slots=slots)
        assert torch.equal(mine[0], pool.k[0]) and torch.equal(mine[1], pool.v[0])
        assert torch.equal(mine[2], pool.slot_frame[0])
    assert (pool.slot_frame[0, :, :sink] >= sink).any()  # a sink slot got a later frame


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 20), (1, 5, 2, 128), (3, 1, 1, 6)])
def test_interp_fp8_quantize_dequantize(interp: None, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _fp8_input(shape, dtype, seed=20)
    q, scale = fp8_quantize_triton(x)
    q_ref, scale_ref = fp8_quantize_ref(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)
    _check_fp8_round_trip(x, q, scale)
    for out in (torch.float32, torch.bfloat16):
        back = fp8_dequantize_triton(q, scale, out)
        assert back.dtype == out
        torch.testing.assert_close(back, fp8_dequantize_ref(q, scale, out), **tol(out))
        assert (back[0, 0] == 0).all()
