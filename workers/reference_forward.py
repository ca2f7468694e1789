"""Cache-free reference forward over a whole sequence, for testing the KV-cache path.

Every latent frame of the sequence is processed at once. Query block b (frames
[b*F, (b+1)*F)) may attend to the key frames the rolling cache would hold at that point:
all earlier frames and its own block when nothing is evicted, otherwise the first `sink`
frames plus the `window` most recent ones (its own block included).

- `rope="baked"`: absolute positions; the key set is an explicit [N*T, N*T] boolean mask and
  attention is one masked call over the whole sequence.
- `rope="late"`: window-relative positions (sink first, then the window in order) differ per
  query block, so each block attends to its gathered key frames separately.

It reuses the model's layers, so it differs from the serving path only in attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.prompt_kv import PromptBatch
from rollcast.workers.rope import apply_rope


def key_frames(block: int, frames_per_block: int, sink: int | None, window: int | None) -> list[int]:
    end = (block + 1) * frames_per_block
    if window is None:
        return list(range(end))
    s = sink or 0
    return list(range(min(s, end))) + list(range(max(s, end - window), end))


@torch.no_grad()
def reference_forward(
    model: CausalWanModel,
    x: Tensor,
    t: Tensor,
    prompts: PromptBatch,
    *,
    frames_per_block: int,
    sink: int | None = None,
    window: int | None = None,
    rope: str = "baked",
) -> Tensor:
    """Flow prediction for latents x [B, C, N, H, W] at timesteps t [B, N], N = blocks * F."""
    b, _, n, _, _ = x.shape
    fpb = frames_per_block
    if n % fpb:
        raise ValueError(f"{n} frames is not a whole number of {fpb}-frame blocks")
    tokens, e, e0, grid = model.embed(x, t)
    gh, gw = grid[1], grid[2]
    tpf = gh * gw
    blocks = n // fpb

    if rope == "baked":
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for blk in range(blocks):
            allowed[blk * fpb : (blk + 1) * fpb, key_frames(blk, fpb, sink, window)] = True
        mask = allowed.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1).to(x.device)
        pos = torch.arange(n, device=x.device)[None].expand(b, n)
        cos, sin = model.rope.cos_sin(pos, gh, gw)

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
            return out.transpose(1, 2)

    elif rope == "late":
        s = sink or 0

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            outs = []
            for blk in range(blocks):
                keys = key_frames(blk, fpb, sink, window)
                end = (blk + 1) * fpb
                first_win = max(s, end - (window if window is not None else end))
                def rel(f: int, fw: int = first_win) -> int:
                    return f if f < s else s + f - fw
                qf = list(range(blk * fpb, end))
                qc, qs = model.rope.cos_sin(torch.tensor([[rel(f) for f in qf]] * b), gh, gw)
                kc, ks = model.rope.cos_sin(torch.tensor([[rel(f) for f in keys]] * b), gh, gw)
                q_tok = q[:, blk * fpb * tpf : end * tpf]
                k_idx = torch.tensor([f * tpf + i for f in keys for i in range(tpf)])
                kb = apply_rope(k[:, k_idx], kc, ks)
                qb = apply_rope(q_tok, qc, qs)
                o = F.scaled_dot_product_attention(
                    qb.transpose(1, 2), kb.transpose(1, 2), v[:, k_idx].transpose(1, 2)
                )
                outs.append(o.transpose(1, 2))
            return torch.cat(outs, dim=1)

    else:
        raise ValueError(f"rope must be 'baked' or 'late', got {rope!r}")

    tokens = model.run_layers(tokens, e0, prompts, attend)
    return model.unpatchify(model.head(tokens, e), grid)
