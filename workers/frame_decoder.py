"""VAE decoding of finished blocks for many streams, each with its own causal decode state.

A pipeline-parallel worker decodes on its last stage (or a dedicated decode stage) rather than
on the driver, which shares stage 0's device: the decode then overlaps the other micro-batches'
forwards instead of adding to every block's latency on one device. Streams are keyed by the KV
cache row of the stream state whose blocks are decoded (a row belongs to one stream at a time).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from rollcast.workers.vae import StreamingVAE
from rollcast.workers.video_file import to_uint8


class FrameDecoder:
    def __init__(self, vae: StreamingVAE) -> None:
        self.vae = vae
        self._states: dict[int, Any] = {}

    def open(self, key: int) -> None:
        """A new stream on `key` (a reused key starts from a fresh decode state)."""
        self._states[key] = self.vae.decode_state()

    def release(self, key: int) -> None:
        self._states.pop(key, None)

    def decode(self, key: int, x0: Tensor) -> np.ndarray:
        """A finished block's clean latents [C, F, h, w] → uint8 frames [T, H, W, 3] (host)."""
        try:
            state = self._states[key]
        except KeyError:
            raise ValueError(f"no decode stream is open on row {key}") from None
        px = self.vae.decode_chunk(x0[None].to(self.vae.dtype), state)
        return to_uint8(px[0])
