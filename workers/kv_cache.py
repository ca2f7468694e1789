"""Rolling self-attention KV cache: preallocated ring buffers with never-evicted sink frames.

Layout of one session's cache (a *row* of the pool), per layer, in latent frames:

    slot:   0 .. sink-1          | sink .. sink+window-1
    holds:  frames 0 .. sink-1   | frame f >= sink lives in slot sink + (f - sink) % window

A block writes its frames' slots *before* attending, so the frames it overwrites are exactly the
ones that left the window, re-denoising the same block overwrites the same slots, and a query
attends to every valid slot (sink + the `window` most recent frames, itself included). Slot
order does not matter to attention: positions travel with the keys (baked RoPE) or are given to
them at attention time (late RoPE). A per-slot frame index (-1 = empty) gives the validity mask
and the late-RoPE positions, so rows at different stream positions batch in one static-shape
attention call. Everything per step is a device op; no host sync.

The pool is preallocated for `rows` sessions, so a session start allocates nothing and a session
end frees a row, never device memory.

`kv_dtype="fp8"` stores K/V as float8 e4m3 with one float32 scale per token and head
(`k_scale`/`v_scale`, kernels/fp8_kv.py): about half the bytes of a bf16 cache, so about twice the
sessions where the cache is what limits them (reference/performance.md section 4). Writes
quantise; attention reads dequantise to the compute dtype. The error this adds to the model's
outputs is measured by `rollcast.kernels.kv_error` (docs/benchmarking.md, "fp8 KV cache").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rollcast.kernels import FP8_DTYPE, fp8_dequantize, kv_cache_write, qk_norm_rope
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.rope import Rope3D

KV_DTYPES = (None, "fp8")  # None: K/V in the compute dtype (`dtype`)


class CacheFullError(RuntimeError):
    """No free row in the KV cache pool."""


class KVCachePool:
    """K/V ring buffers for `rows` sessions over the layers `layers` (global numbering)."""

    def __init__(
        self,
        *,
        layers: range,
        rows: int,
        policy: CachePolicy,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        kv_dtype: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if rows < 1:
            raise ValueError(f"KV cache pool needs at least one row, got {rows}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be None (the compute dtype) or 'fp8', got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        self.layers = layers
        self.rows = rows
        self.policy = policy
        self.tokens_per_frame = tokens_per_frame
        self.capacity = policy.capacity_frames
        shape = (len(layers), rows, self.capacity * tokens_per_frame, num_heads, head_dim)
        store = FP8_DTYPE if kv_dtype == "fp8" else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        # fp8 only: one float32 scale per token and head [L, rows, C*T, H]; a zero scale (never
        # written) dequantises to zeros, like an empty bf16 slot.
        self.k_scale: Tensor | None = None
        self.v_scale: Tensor | None = None
        if kv_dtype == "fp8":
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        # Absolute frame index held by each slot, per layer (sink refresh decides per layer).
        self.slot_frame = torch.full(
            (len(layers), rows, self.capacity), -1, dtype=torch.long, device=device
        )
        # Slot the current 1-frame block writes, fixed at its first step (sink refresh only).
        self.block_slot = torch.zeros((len(layers), rows), dtype=torch.long, device=device)
        self._free = list(range(rows - 1, -1, -1))
        self._written: list[set[int]] = [set() for _ in range(rows)]  # host copy of filled slots

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes of K/V (and fp8 scales): what the cache costs in device memory."""
        return sum(t.nbytes for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)

    @property
    def nbytes_per_layer(self) -> int:
        """Device bytes one layer's K/V (and scales) take: what a stage holding it allocates."""
        per = (t.shape[1:].numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale)
               if t is not None)
        return sum(per)

    def _buffers(self) -> dict[str, Tensor]:
        """Every per-layer buffer (leading axis: layer) by name, as `export_layer` names them."""
        bufs = {"k": self.k, "v": self.v, "slot_frame": self.slot_frame, "block_slot": self.block_slot}
        if self.k_scale is not None and self.v_scale is not None:
            bufs.update(k_scale=self.k_scale, v_scale=self.v_scale)
        return bufs

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self, row: int | None = None) -> int:
        """Take the next free row, or exactly `row` (a pipeline stage mirrors its driver's choice)."""
        if not self._free:
            raise CacheFullError(f"all {self.rows} KV cache rows are in use")
        if row is None:
            row = self._free.pop()
        elif row in self._free:
            self._free.remove(row)
        else:
            raise ValueError(f"KV cache row {row} is not free")
        self.reset_row(row)
        return row

    def release(self, row: int) -> None:
        if row in self._free or not 0 <= row < self.rows:
            raise ValueError(f"KV cache row {row} is not allocated")
        self.reset_row(row)
        self._free.append(row)

    def reset_row(self, row: int) -> None:
        """Forget every frame of one session (the buffers are masked, not cleared)."""
        self.slot_frame[:, row] = -1
        self._written[row].clear()

    # -- moving layers between pipeline stages ------------------------------------------------

    def export_layer(self, layer: int) -> dict[str, Tensor]:
        """Everything this pool holds for one layer, every row (for its new owner): K, V, the
        slot bookkeeping and, for fp8, the scales (the bytes alone are meaningless without them)."""
        li = layer - self.layers.start
        return {name: buf[li] for name, buf in self._buffers().items()}

    def relayer(self, layers: range, imported: dict[int, dict[str, Tensor]]) -> None:
        """Hold `layers` from now on: keep the layers in both ranges, take the others from
        `imported` (as `export_layer` gave them), drop the rest. Rows and their bookkeeping stay."""
        missing = [i for i in layers if i not in self.layers and i not in imported]
        if missing:
            raise ValueError(f"relayering to {layers} needs the caches of layers {missing}")
        old = self._buffers()
        for layer in layers:
            if layer in imported and set(imported[layer]) != set(old):
                # copy_ would convert bf16 into fp8 bytes (or back) without the scales.
                raise ValueError(f"layer {layer}'s cache has {sorted(imported[layer])}, this pool holds "
                                 f"{sorted(old)}: stages must agree on kv_dtype")
        new = {name: buf.new_empty((len(layers), *buf.shape[1:])) for name, buf in old.items()}
        for new_i, layer in enumerate(layers):
            src = imported.get(layer) or self.export_layer(layer)
            for name, buf in new.items():
                buf[new_i].copy_(src[name])
        self.layers = layers
        self.k, self.v = new["k"], new["v"]
        self.slot_frame, self.block_slot = new["slot_frame"], new["block_slot"]
        self.k_scale, self.v_scale = new.get("k_scale"), new.get("v_scale")

    def slot_of(self, frame: int) -> int:
        sink, window = self.policy.sink_frames, self.policy.window_frames
        return frame if frame < sink else sink + (frame - sink) % window

    def batch(
        self,
        *,
        rows: list[int],
        frames: list[list[int]],
        rope_positions: list[list[int]],
        new_block: list[bool],
        grid_hw: tuple[int, int],
        rope: Rope3D,
    ) -> KVBatch:
        """Metadata for one forward that writes the latent `frames` of each row.

        `rope_positions` are the frames' positions for baked RoPE (absolute, or reset by the
        policy); late RoPE ignores them and uses window-relative positions.
        """
        dev = self.device
        if not rows or {len(frames), len(rope_positions), len(new_block)} != {len(rows)}:
            raise ValueError("a KV batch needs one frame list, position list and flag per row")
        if len({len(fs) for fs in frames}) != 1 or any(
                len(p) != len(fs) for p, fs in zip(rope_positions, frames, strict=True)):
            raise ValueError("every row of a KV batch must write the same number of frames")
        unallocated = sorted(set(rows) & set(self._free))
        if unallocated:
            raise ValueError(f"KV batch uses rows that are not allocated: {unallocated}")
        slots = [[self.slot_of(f) for f in fs] for fs in frames]
        if any(len(set(sl)) != len(sl) for sl in slots):
            raise ValueError(f"a forward of {len(slots[0])} frames does not fit a cache of "
                             f"{self.policy.sink_frames} sink + {self.policy.window_frames} window frames")
        rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
        write_frame = torch.tensor(frames, dtype=torch.long, device=dev)
        write_slot = torch.tensor(slots, dtype=torch.long, device=dev)
        sink, window = self.policy.sink_frames, self.policy.window_frames
        late = self.policy.rope == "late"
        q_pos = rope_positions
        if late:
            # Window-relative positions: sink at 0..sink-1, then the window in frame order.
            first_win = [max(sink, fs[-1] + 1 - window) for fs in frames]
            q_pos = [[f if f < sink else sink + f - fw for f in fs]
                     for fs, fw in zip(frames, first_win, strict=True)]
        q_cos, q_sin = rope.cos_sin(torch.tensor(q_pos, device=dev), *grid_hw)
        k_cos = k_sin = None
        if late:
            after = self.slot_frame[0].index_select(0, rows_t).scatter(1, write_slot, write_frame)
            slot_idx = torch.arange(self.capacity, device=dev)[None]
            fw = torch.tensor(first_win, dtype=torch.long, device=dev)[:, None]
            k_pos = torch.where(slot_idx < sink, slot_idx, sink + after - fw).clamp_min(0)
            k_cos, k_sin = rope.cos_sin(k_pos, *grid_hw)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        # Host-known: once every slot of every row has been written, attention runs unmasked
        # (flash kernels on GPU). Sink refresh can redirect a write, so it always masks.
        for r, sl in zip(rows, slots, strict=True):
            self._written[r].update(sl)
        all_valid = self.policy.sink_refresh_threshold is None and all(
            len(self._written[r]) == self.capacity for r in rows)
        return KVBatch(
            pool=self,
            rows=rows_t,
            row_slice=slice(rows[0], rows[0] + len(rows)) if contiguous else None,
            all_valid=all_valid,
            write_slot=write_slot,
            write_frame=write_frame,
            new_block=torch.tensor(new_block, dtype=torch.bool, device=dev),
            q_cos=q_cos,
            q_sin=q_sin,
            k_cos=k_cos,
            k_sin=k_sin,
        )


@dataclass
class KVBatch:
    """One forward's view of the pool: which rows, which slots it writes, RoPE for q and k."""

    pool: KVCachePool
    rows: Tensor  # [B]
    row_slice: slice | None  # rows as a contiguous range: read through views, no gather
    all_valid: bool  # every slot of every row holds a frame: no mask needed
    write_slot: Tensor  # [B, F]
    write_frame: Tensor  # [B, F]
    new_block: Tensor  # [B] first forward of a new block (sink refresh decides then)
    q_cos: Tensor
    q_sin: Tensor
    k_cos: Tensor | None  # late RoPE: angles for every cache slot [B, C*T, 1, D/2]
    k_sin: Tensor | None

    def _rows(self, buf: Tensor) -> Tensor:
        if self.row_slice is not None:
            return buf[self.row_slice]
        if buf.dtype == FP8_DTYPE:
            # index_select has no float8 kernel on every backend; the bytes are what matter.
            return buf.view(torch.uint8).index_select(0, self.rows).view(FP8_DTYPE)
        return buf.index_select(0, self.rows)

    def _cached(self, li: int, tokens: int | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """This batch's rows of layer `li`'s cached K and V (the first `tokens` of each row, or
        all), in the cache's dtype, or dequantised to `dtype` from fp8."""
        pool = self.pool
        cut = slice(None, tokens)
        kc, vc = self._rows(pool.k[li, :, cut]), self._rows(pool.v[li, :, cut])
        if pool.k_scale is not None and pool.v_scale is not None:
            kc = fp8_dequantize(kc, self._rows(pool.k_scale[li, :, cut]), dtype)
            vc = fp8_dequantize(vc, self._rows(pool.v_scale[li, :, cut]), dtype)
        return kc, vc

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write this block's K/V into the cache, then attend over the session's valid slots.

        q, k, v: [B, F*T, H, D] after the q/k RMSNorm, before RoPE. Returns [B, F*T, H, D].
        """
        pool = self.pool
        li = layer - pool.layers.start
        late = pool.policy.rope == "late"
        q = _rope(q, self.q_cos, self.q_sin)
        if not late:
            k = _rope(k, self.q_cos, self.q_sin)
        self._write(li, k, v)
        kc, vc = self._cached(li, None, q.dtype)
        if late:
            kc = _rope(kc, self.k_cos, self.k_sin)  # type: ignore[arg-type]
        mask = None
        if not self.all_valid:
            valid = self._rows(pool.slot_frame[li]) >= 0  # [B, C]
            b, c = valid.shape
            mask = valid[:, :, None].expand(b, c, pool.tokens_per_frame).reshape(b, 1, 1, -1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)

    def _write(self, li: int, k: Tensor, v: Tensor) -> None:
        pool = self.pool
        # The ring slots `batch` worked out (what `ring_slots` would give), or the sink refresh's.
        slots = self.write_slot
        if pool.policy.sink_refresh_threshold is not None:
            slots = self._refresh_slots(li, k, v)
        kv_cache_write(
            pool.k[li], pool.v[li], pool.slot_frame[li], k, v, self.rows, self.write_frame,
            sink=pool.policy.sink_frames, window=pool.policy.window_frames, slots=slots,
            k_scale=pool.k_scale[li] if pool.k_scale is not None else None,
            v_scale=pool.v_scale[li] if pool.v_scale is not None else None,
        )

    def _refresh_slots(self, li: int, k: Tensor, v: Tensor) -> Tensor:
        """StreamDiffusionV2 adaptive sink: a new frame unlike some sink frame replaces it.

        Decided once per block (its first forward); later steps of the block write the same slot.
        """
        pool = self.pool
        sink, t = pool.policy.sink_frames, pool.tokens_per_frame
        rows = self.rows
        # The sink frames as [B, sink, T, H*D] float32 (dequantised from fp8).
        ks, vs = (c.float().unflatten(1, (sink, t)).flatten(3)
                  for c in self._cached(li, sink * t, torch.float32))
        k_new = k.float().flatten(2).mean(1)[:, None]  # [B, 1, H*D]
        v_new = v.float().flatten(2).mean(1)[:, None]
        sim = 0.5 * (
            F.cosine_similarity(k_new, ks.mean(2), dim=-1) + F.cosine_similarity(v_new, vs.mean(2), dim=-1)
        )  # [B, sink]
        min_sim, least = sim.min(dim=1)
        sink_full = pool.slot_frame[li].index_select(0, rows)[:, sink - 1] >= 0
        past_sink = self.write_frame[:, 0] >= sink
        refresh = (
            self.new_block & sink_full & past_sink
            & (min_sim < pool.policy.sink_refresh_threshold)  # type: ignore[operator]
        )
        chosen = torch.where(refresh, least, self.write_slot[:, 0])
        current = pool.block_slot[li].index_select(0, rows)
        decided = torch.where(self.new_block, chosen, current)
        pool.block_slot[li].index_put_((rows,), decided)
        return decided[:, None]


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on q or k [B, L, H, D] (float32 math, x's dtype out): the q/k kernel, norm switched off."""
    return qk_norm_rope(x, None, cos, sin, num_heads=x.shape[2])
