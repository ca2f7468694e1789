"""fp8 (e4m3) KV cache: its memory, its error on a session's outputs, and moving its layers between
pipeline stages (scales included)."""

from __future__ import annotations

import pytest
import torch

from rollcast.kernels import FP8_DTYPE
from rollcast.kernels.kv_error import fp8_kv_error
from rollcast.workers import CachePolicy, ModelConfig
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.rope import Rope3D
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec, build_pool

POLICY = CachePolicy("t", sink_frames=1, window_frames=3)


def _pool(kv_dtype: str | None = None, *, dtype: torch.dtype = torch.float32, layers: range = range(4),
          policy: CachePolicy = POLICY, t: int = 3, h: int = 2, hd: int = 8, rows: int = 2) -> KVCachePool:
    return KVCachePool(layers=layers, rows=rows, policy=policy, tokens_per_frame=t, num_heads=h, head_dim=hd,
                       dtype=dtype, kv_dtype=kv_dtype)


def _fill(pool: KVCachePool, blocks: int, seed: int, fpb: int = 2) -> None:
    """Write `blocks` blocks of `fpb` frames of random K/V into every layer of every row."""
    g = torch.Generator().manual_seed(seed)
    rows = [pool.allocate() for _ in range(pool.rows)]
    t, h, hd = pool.tokens_per_frame, pool.k.shape[3], pool.k.shape[4]
    for start in range(0, fpb * blocks, fpb):
        frames = [[start + r + i for i in range(fpb)] for r in range(len(rows))]
        kv = pool.batch(rows=rows, frames=frames, rope_positions=frames, new_block=[True] * len(rows),
                        grid_hw=(1, t), rope=Rope3D(hd))
        for li in range(len(pool.layers)):
            k, v = (torch.randn(len(rows), fpb * t, h, hd, generator=g) * 3 for _ in range(2))
            kv._write(li, k, v)


# -- (a) memory --------------------------------------------------------------------------------------


def test_fp8_pool_holds_about_half_a_bf16_pool_and_a_quarter_of_fp32() -> None:
    hd = 128  # the real models' head size
    fp8, bf16, fp32 = (_pool(k, dtype=d, hd=hd) for k, d in (("fp8", torch.float32),
                                                            (None, torch.bfloat16), (None, torch.float32)))
    assert fp8.k.dtype == fp8.v.dtype == FP8_DTYPE and fp8.k_scale is not None and fp8.v_scale is not None
    assert fp8.k_scale.shape == fp8.k.shape[:-1] and fp8.k_scale.dtype == torch.float32
    assert bf16.k_scale is None and bf16.k.dtype == torch.bfloat16
    # Per token and head: hd bytes of e4m3 + a 4-byte scale, against 2 hd (bf16) or 4 hd (fp32).
    assert fp8.nbytes * 2 * hd == bf16.nbytes * (hd + 4)
    assert fp8.nbytes * 4 * hd == fp32.nbytes * (hd + 4)
    assert 0.5 < fp8.nbytes / bf16.nbytes < 0.52 and 0.25 < fp8.nbytes / fp32.nbytes < 0.26


def test_kv_dtype_is_validated_and_reaches_the_pool() -> None:
    with pytest.raises(ValueError, match="kv_dtype"):
        _pool("int4")
    spec = WorkerSpec(config=ModelConfig.preset("tiny"), policy=POLICY,
                      sampler=SamplerConfig.preset("self-forcing"), resolution=(64, 64), max_sessions=1)
    with pytest.raises(ValueError, match="--kv-dtype"):
        WorkerSpec(**{**spec.__dict__, "kv_dtype": "fp16"})
    assert build_pool(spec, range(2)).k.dtype == torch.float32
    # "bf16" is the default: the model's dtype (float32 here).
    assert build_pool(WorkerSpec(**{**spec.__dict__, "kv_dtype": "bf16"}), range(2)).k.dtype == torch.float32
    assert build_pool(WorkerSpec(**{**spec.__dict__, "kv_dtype": "fp8"}), range(2)).k.dtype == FP8_DTYPE


# -- reading and writing ---------------------------------------------------------------------------


@pytest.mark.parametrize("rope", ["baked", "late"])
def test_attention_reads_the_dequantised_cache(rope: str) -> None:
    """attend() on an fp8 pool is attend() on a float32 pool holding what the fp8 pool dequantises to."""
    policy = CachePolicy("t", sink_frames=1, window_frames=3, rope=rope)  # type: ignore[arg-type]
    fp8, ref = _pool("fp8", policy=policy, layers=range(1)), _pool(policy=policy, layers=range(1))
    g = torch.Generator().manual_seed(3)
    rows = [fp8.allocate(), fp8.allocate()]
    assert [ref.allocate(), ref.allocate()] == rows
    t, h, hd = 3, 2, 8
    for start in range(0, 8, 2):
        frames = [[start, start + 1], [start + 1, start + 2]]
        q, k, v = (torch.randn(2, 2 * t, h, hd, generator=g) for _ in range(3))
        batches = [p.batch(rows=rows, frames=frames, rope_positions=frames, new_block=[True, True],
                           grid_hw=(1, t), rope=Rope3D(hd)) for p in (fp8, ref)]
        got = batches[0].attend(0, q, k, v)
        # The reference pool holds exactly what the fp8 one dequantises to.
        ref.k[0].copy_(fp8.k[0].float() * fp8.k_scale[0, ..., None])  # type: ignore[index]
        ref.v[0].copy_(fp8.v[0].float() * fp8.v_scale[0, ..., None])  # type: ignore[index]
        ref.slot_frame.copy_(fp8.slot_frame)
        want = _attend_without_write(batches[1], q)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _attend_without_write(kv, q: torch.Tensor) -> torch.Tensor:
    """KVBatch.attend with the cache write skipped (the buffers were already set)."""
    write = kv._write
    kv._write = lambda *a: None
    try:
        return kv.attend(0, q, q, q)  # k/v are not written, so any tensors do
    finally:
        kv._write = write


def test_sink_refresh_works_on_an_fp8_cache() -> None:
    policy = CachePolicy("t", sink_frames=2, window_frames=3, sink_refresh_threshold=2.0)  # always refresh
    pool = _pool("fp8", policy=policy, layers=range(1))
    _fill(pool, blocks=8, seed=4, fpb=1)  # sink refresh runs 1-frame blocks
    assert (pool.slot_frame[0, :, :2] >= 2).any()  # a sink slot got a later frame
    # Scales were written exactly with the slots the refresh chose (empty slots keep scale 0).
    written = (pool.slot_frame[0] >= 0).repeat_interleave(pool.tokens_per_frame, dim=1)
    for scales in (pool.k_scale, pool.v_scale):
        assert scales is not None and torch.equal(scales[0].amax(-1) > 0, written)


# -- (b) error on a session's outputs ---------------------------------------------------------------

# Measured (tiny preset, 64x64, 6 blocks, fp32 model, seeds 0-2): x0 relative error 6.3-7.2e-4,
# worst block 1.0e-3, decoded frames at most 1 level apart (2-5 % of values). The bounds leave 5-10x
# margin; the lower bound fails if the fp8 cache is silently not used (the runs would be identical).
X0_REL_BOUND = 5e-3
SESSION_POLICY = CachePolicy("t", sink_frames=3, window_frames=6)  # rolls after 3 blocks


def test_fp8_session_outputs_stay_close_to_the_full_precision_cache() -> None:
    spec = WorkerSpec(config=ModelConfig.preset("tiny"), policy=SESSION_POLICY,
                      sampler=SamplerConfig.preset("self-forcing"), resolution=(64, 64), max_sessions=1)
    r = fp8_kv_error(spec, blocks=6)
    assert r.kv_bytes_fp8 < 0.3 * r.kv_bytes_ref  # fp32 model: a quarter, plus scales
    assert 0 < r.x0_rel_error < X0_REL_BOUND, r
    assert all(0 < e < X0_REL_BOUND for e in r.x0_block_rel_errors), r
    assert r.frames_max_abs <= 4 and r.frames_mean_abs < 0.5, r


# -- (c) moving layers between stages ----------------------------------------------------------------


def test_export_and_relayer_carry_fp8_bytes_and_scales_exactly() -> None:
    a = _pool("fp8")  # a stage holding layers 0..3
    _fill(a, blocks=3, seed=5)
    exported = {layer: {k: t.clone() for k, t in a.export_layer(layer).items()} for layer in (2, 3)}
    assert set(exported[2]) == {"k", "v", "k_scale", "v_scale", "slot_frame", "block_slot"}
    b = _pool("fp8", layers=range(0, 2))  # its neighbour, taking layers 2 and 3 over
    b.relayer(range(0, 4), exported)
    for name in ("k", "v"):
        assert getattr(b, name).dtype == FP8_DTYPE
        assert torch.equal(getattr(b, name)[2:].view(torch.uint8), getattr(a, name)[2:].view(torch.uint8))
    for name in ("k_scale", "v_scale", "slot_frame", "block_slot"):
        assert torch.equal(getattr(b, name)[2:], getattr(a, name)[2:]), name
    assert b.nbytes == a.nbytes
    # Dropping layers keeps the others' bytes and scales.
    a_k3, a_s3 = a.k[3].clone(), a.k_scale[3].clone()  # type: ignore[index]
    a.relayer(range(3, 4), {})
    assert torch.equal(a.k[0].view(torch.uint8), a_k3.view(torch.uint8)) and torch.equal(a.k_scale[0], a_s3)  # type: ignore[index]
    assert a.nbytes * 4 == b.nbytes


def test_relayer_refuses_a_cache_of_the_other_kv_dtype() -> None:
    fp8, full = _pool("fp8"), _pool(layers=range(0, 2))
    with pytest.raises(ValueError, match="kv_dtype"):
        full.relayer(range(0, 3), {2: fp8.export_layer(2)})
    with pytest.raises(ValueError, match="kv_dtype"):
        fp8.relayer(range(0, 5), {4: full.export_layer(1)})
