"""3-D rotary position embedding of the Wan2.1 DiT.

Each head's `head_dim` real values form `head_dim / 2` complex pairs of adjacent elements
(2i, 2i+1), split between the frame, row and column axes as Wan does: real widths
`d - 4*(d//6)`, `2*(d//6)`, `2*(d//6)` (22 + 21 + 21 pairs for head_dim 128). Each axis has its
own frequency ladder `theta^(-2i / axis_width)`.

Wan precomputes a 1024-row table; here angles are computed from positions directly, so the
values are the same below 1024 and positions past it are still defined (late-RoPE caches use
window-relative positions anyway).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (frame, row, column)."""
    sixth = head_dim // 6
    return (head_dim - 4 * sixth) // 2, sixth, sixth


class Rope3D:
    """Angle tables for one head size; cos/sin builders for a batch of frame positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        self.head_dim = head_dim
        self.pairs = rope_axis_pairs(head_dim)
        # Inverse frequencies per axis in float64, as Wan computes them.
        self.inv_freq = [
            1.0 / theta ** (torch.arange(0, 2 * n, 2, dtype=torch.float64, device="cpu") / (2 * n))
            for n in self.pairs
        ]
        self._hw_cache: dict[tuple[int, int, str], Tensor] = {}
        self._t_freq: dict[str, Tensor] = {}  # frame-axis frequencies per device

    def hw_angles(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        """Angles of the row and column axes for every token of a frame: [h*w, pairs_h+pairs_w]."""
        key = (grid_h, grid_w, str(device))
        cached = self._hw_cache.get(key)
        if cached is None:
            rows = torch.arange(grid_h, dtype=torch.float64, device="cpu")
            cols = torch.arange(grid_w, dtype=torch.float64, device="cpu")
            ah = torch.outer(rows, self.inv_freq[1])  # [h, ph]
            aw = torch.outer(cols, self.inv_freq[2])  # [w, pw]
            ang = torch.cat(
                [ah[:, None, :].expand(grid_h, grid_w, -1), aw[None, :, :].expand(grid_h, grid_w, -1)],
                dim=-1,
            ).reshape(grid_h * grid_w, -1)
            cached = ang.to(device)
            self._hw_cache[key] = cached
        return cached

    def cos_sin(self, frame_pos: Tensor, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
        """cos/sin for tokens of frames at `frame_pos` ([B, F], any integer or float dtype).

        Returns two float32 tensors [B, F*h*w, 1, head_dim/2] (broadcast over heads), token order
        frame-major then row then column, as the patch embedding flattens them.
        """
        b, f = frame_pos.shape
        dev = str(frame_pos.device)
        if dev not in self._t_freq:
            self._t_freq[dev] = self.inv_freq[0].to(frame_pos.device)
        t_ang = frame_pos.to(torch.float64)[..., None] * self._t_freq[dev]
        hw = self.hw_angles(grid_h, grid_w, frame_pos.device)
        tokens = hw.shape[0]
        ang = torch.cat(
            [t_ang[:, :, None, :].expand(b, f, tokens, -1), hw[None, None].expand(b, f, -1, -1)],
            dim=-1,
        ).reshape(b, f * tokens, 1, -1)
        return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by angles given as cos/sin [B, L, 1, D/2].

    Computed in float32 and returned in x's dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
