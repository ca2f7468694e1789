"""Rolling KV cache write: a block's K/V scattered into the ring-buffer slots of its frames.

Per layer and session row, the cache holds `sink + window` frame slots of T tokens each (see
workers/kv_cache.py): frame f < sink lives in slot f, frame f >= sink in slot
`sink + (f - sink) % window`, so the sink slots are only ever written by the first `sink` frames
and a frame past the sink overwrites exactly the frame that left the window. Re-denoising a block
rewrites the same slots. `slots` overrides the mapping for the adaptive sink refresh
(`KVBatch._refresh_slots`), the one case where a later frame replaces a sink frame.

The kernel replaces three `index_put_` calls (K, V, slot→frame table) and their index tensors with
one gather-free copy per tile; the slot arithmetic runs on device, so no host sync. An fp8 cache
(`float8_e4m3fn` buffers plus per-token-per-head float32 scale buffers) is written as quantised
K/V and scales (`kernels/fp8_kv.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollcast.kernels.dispatch import cdiv, next_pow2, tl, triton_kernel, use_triton, warps_for
from rollcast.kernels.fp8_kv import FP8_DTYPE, fp8_quantize, fp8_quantize_ref

__all__ = ["kv_cache_write", "kv_cache_write_ref", "kv_cache_write_triton", "ring_slots"]


def ring_slots(frames: Tensor, sink: int, window: int) -> Tensor:
    """Cache slot of each absolute frame index (`KVCachePool.slot_of`, elementwise on device)."""
    return torch.where(frames < sink, frames, sink + (frames - sink).remainder(window))


def _check(
    k_cache: Tensor, v_cache: Tensor, slot_frame: Tensor, k: Tensor, v: Tensor, rows: Tensor,
    frames: Tensor, sink: int, window: int, k_scale: Tensor | None, v_scale: Tensor | None,
) -> int:
    """Validate shapes (never values: that would sync with the device); return tokens per frame."""
    r, cap_tok, h, d = k_cache.shape
    b, f = frames.shape
    cap = slot_frame.shape[1]
    if cap != sink + window or slot_frame.shape[0] != r or cap_tok % cap:
        raise ValueError(f"slot_frame {tuple(slot_frame.shape)} does not match {sink} sink + {window} window "
                         f"slots of a cache {tuple(k_cache.shape)}")
    t = cap_tok // cap
    if v_cache.shape != k_cache.shape or k.shape != (b, f * t, h, d) or v.shape != k.shape:
        raise ValueError(f"k/v must be [{b}, {f}*{t}, {h}, {d}] for a cache {tuple(k_cache.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if rows.shape != (b,):
        raise ValueError(f"rows must be [{b}], got {tuple(rows.shape)}")
    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8 != (k_scale is not None and v_scale is not None):
        raise ValueError("an fp8 cache needs k_scale and v_scale buffers (and only an fp8 cache has them)")
    if fp8 and (k_scale.shape != (r, cap_tok, h) or v_scale.shape != k_scale.shape):  # type: ignore[union-attr]
        raise ValueError(f"scale buffers must be [{r}, {cap_tok}, {h}]")
    return t


def kv_cache_write_ref(
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
    frames: Tensor,
    *,
    sink: int,
    window: int,
    slots: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """Write k/v [B, F*T, H, Dh] of `frames` [B, F] into cache rows `rows` [B], in place.

    k_cache/v_cache: one layer's buffers [R, (sink+window)*T, H, Dh]; slot_frame [R, sink+window]
    gets the frame index of every written slot. fp8 caches also take k_scale/v_scale [R, C*T, H].
    """
    t = _check(k_cache, v_cache, slot_frame, k, v, rows, frames, sink, window, k_scale, v_scale)
    slots = ring_slots(frames, sink, window) if slots is None else slots
    # Indexed per (row, slot) on [R, C, T, ...] views: a whole frame per index, so no per-token
    # index tensor is built (what made this slower than the inline code it replaced on CPU).
    idx = (rows[:, None], slots)

    def by_frame(x: Tensor) -> Tensor:
        return x.unflatten(1, (-1, t))  # a view, also of the cache: index_put_ writes through

    if k_scale is not None and v_scale is not None:
        for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
            q, s = fp8_quantize_ref(x)
            # index_put_ has no float8 kernel on every backend; the bytes are what matter.
            by_frame(cache.view(torch.uint8)).index_put_(idx, by_frame(q.view(torch.uint8)))
            by_frame(scales).index_put_(idx, by_frame(s))
    else:
        by_frame(k_cache).index_put_(idx, by_frame(k.to(k_cache.dtype)))
        by_frame(v_cache).index_put_(idx, by_frame(v.to(v_cache.dtype)))
    slot_frame.index_put_(idx, frames.to(slot_frame.dtype))


@triton_kernel
def _ring_write_kernel(
    src_ptr, dst_ptr, slot_frame_ptr, rows_ptr, frames_ptr, slots_ptr,
    n_frames, tok_per_frame, width, sink, window,
    s_src_b, s_src_t, s_dst_r, s_dst_t, s_sf_r, s_fr_b, s_sl_b,
    HAS_SLOTS: tl.constexpr, WRITE_META: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Program (b*F + f, token tile, feature tile): copies a [BLOCK_T, BLOCK_W] tile of frame f of
    # batch entry b to its slot in cache row rows[b]. A token's features are contiguous.
    bf = tl.program_id(0)
    b = bf // n_frames
    f = bf % n_frames
    row = tl.load(rows_ptr + b)
    frame = tl.load(frames_ptr + b * s_fr_b + f)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + b * s_sl_b + f)
    else:
        slot = tl.where(frame < sink, frame, sink + (frame - sink) % window)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    m = (t < tok_per_frame)[:, None] & (c < width)[None, :]
    src = src_ptr + b * s_src_b + (f * tok_per_frame + t)[:, None] * s_src_t + c[None, :]
    x = tl.load(src, mask=m, other=0.0)
    dst = dst_ptr + row * s_dst_r + (slot * tok_per_frame + t)[:, None] * s_dst_t + c[None, :]
    tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=m)
    if WRITE_META:
        # One program per frame records which frame the slot now holds.
        first = (tl.program_id(1) == 0) & (tl.program_id(2) == 0)
        tl.store(slot_frame_ptr + row * s_sf_r + slot, frame.to(slot_frame_ptr.dtype.element_ty), mask=first)


def _token_rows(x: Tensor) -> Tensor:
    """[N0, N1, ...] -> [N0, N1, prod(rest)] with unit stride inside a token (a view when possible)."""
    flat = x.flatten(2) if x.dim() > 3 else x
    if flat.dim() == 2:
        flat = flat[..., None]
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _ring_write(
    src: Tensor, dst: Tensor, slot_frame: Tensor, rows: Tensor, frames: Tensor, slots: Tensor | None,
    t: int, sink: int, window: int, write_meta: bool,
) -> None:
    if not dst.is_contiguous():
        raise ValueError("cache buffers must be contiguous (the kernel writes them in place)")
    if dst.dtype == FP8_DTYPE:
        # Already quantised: move bytes, which needs no fp8 support in the GPU (pre-sm89 too).
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)
    src3, dst3 = _token_rows(src), _token_rows(dst)
    b, f = frames.shape
    width = src3.shape[2]
    block_w = min(1024, next_pow2(width))
    block_t = max(1, min(next_pow2(t), 4096 // block_w))
    grid = (b * f, cdiv(t, block_t), cdiv(width, block_w))
    _ring_write_kernel[grid](
        src3, dst3, slot_frame, rows, frames, slots if slots is not None else frames,
        f, t, width, sink, window,
        src3.stride(0), src3.stride(1), dst3.stride(0), dst3.stride(1), slot_frame.stride(0),
        frames.stride(0), slots.stride(0) if slots is not None else 0,
        HAS_SLOTS=slots is not None, WRITE_META=write_meta,
        BLOCK_T=block_t, BLOCK_W=block_w, num_warps=warps_for(block_t * block_w),
    )


def kv_cache_write_triton(
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
    frames: Tensor,
    *,
    sink: int,
    window: int,
    slots: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    t = _check(k_cache, v_cache, slot_frame, k, v, rows, frames, sink, window, k_scale, v_scale)
    if any(t is not None and t.stride(-1) != 1 for t in (slot_frame, frames, slots)):
        raise ValueError("slot_frame, frames and slots need a unit last stride")
    rows = rows.contiguous()
    if k_scale is not None and v_scale is not None:
        # fp8: quantise (the dispatcher: torch on GPUs without e4m3 in Triton), then scatter the
        # e4m3 bytes and the scales with the same ring mapping.
        qk, sk = fp8_quantize(k)
        qv, sv = fp8_quantize(v)
        writes = ((qk, k_cache), (sk, k_scale), (qv, v_cache), (sv, v_scale))
    else:
        writes = ((k, k_cache), (v, v_cache))
    for i, (src, dst) in enumerate(writes):
        _ring_write(src, dst, slot_frame, rows, frames, slots, t, sink, window, write_meta=i == 0)


def kv_cache_write(
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
    frames: Tensor,
    *,
    sink: int,
    window: int,
    slots: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """Dispatcher: `kv_cache_write_triton` on CUDA (or when forced), else `kv_cache_write_ref`."""
    impl = kv_cache_write_triton if use_triton(k_cache, k, kernel="kv_cache_write") else kv_cache_write_ref
    impl(k_cache, v_cache, slot_frame, k, v, rows, frames, sink=sink, window=window, slots=slots,
         k_scale=k_scale, v_scale=v_scale)
