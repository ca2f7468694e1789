"""Decoding finished blocks where x0 comes out of the pipeline: on the last DiT stage, or on an
optional dedicated decode stage after it (its own rank and device, so the VAE does not slow the
last stage's layers; the ring then ends there instead).

A forward that finishes blocks carries `decode`: per sample the cache row whose VAE decode stream
decodes it (-1: none). The frames of all decoded samples travel back concatenated along time
(`frames`, uint8 [sum T, H, W, 3]) with `frame_counts` [B] (0: not decoded), and the decode's
seconds in `decode_s`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from rollcast.pipeline_parallel.ring_messages import ANSWERED, RING_TAG, encode_text
from rollcast.pipeline_parallel.transport import Transport
from rollcast.workers.frame_decoder import FrameDecoder
from rollcast.workers.vae import VaeSpec


def decode_outputs(decoder: FrameDecoder, x0: Tensor, rows: list[int]) -> dict[str, Tensor]:
    """Decode the samples of `x0` [B, C, F, h, w] whose row is >= 0, on their rows' streams."""
    t0 = time.perf_counter()
    pieces = [decoder.decode(row, x0[i]) if row >= 0 else None for i, row in enumerate(rows)]
    done = [p for p in pieces if p is not None]
    frames = torch.from_numpy(np.concatenate(done)) if done else torch.zeros(0, dtype=torch.uint8)
    counts = torch.tensor([0 if p is None else len(p) for p in pieces], dtype=torch.long)
    return {"frames": frames, "frame_counts": counts,
            "decode_s": torch.tensor(time.perf_counter() - t0, dtype=torch.float64)}


def split_frames(msg: Mapping[str, Tensor]) -> list[np.ndarray | None]:
    """The per-sample frames of a reply (None where nothing was decoded)."""
    if "frame_counts" not in msg:
        return [None] * len(msg["x0"])
    out: list[np.ndarray | None] = []
    start = 0
    frames = msg["frames"]
    for n in msg["frame_counts"].tolist():
        out.append(frames[start:start + n].numpy().copy() if n else None)
        start += n
    return out


class DecodeStage:
    """The dedicated decode stage: rank `stages + 1`, between the last DiT stage and the driver."""

    def __init__(self, vae: VaeSpec, rank: int, device: str | None = None) -> None:
        self.rank = rank
        self.decoder = FrameDecoder(vae.build(device))

    def serve(self, transport: Transport) -> None:
        prev = self.rank - 1
        while True:
            kind, msg = transport.recv(prev, tag=RING_TAG)
            if kind == "open_row":
                self.decoder.open(int(msg["row"]))
            elif kind == "release_row":
                self.decoder.release(int(msg["row"]))
            elif kind == "forward":
                try:
                    out_kind, out = kind, self.forward(msg)
                except (RuntimeError, ValueError) as e:  # that forward's sessions fail; we live
                    out_kind, out = "error", {"text": encode_text(f"decode stage: {type(e).__name__}: {e}")}
                transport.send(0, out_kind, out, tag=RING_TAG)
            elif kind in ANSWERED:
                transport.send(0, kind, {k: t.clone() for k, t in msg.items()}, tag=RING_TAG)
            if kind == "stopped":
                return

    @torch.no_grad()
    def forward(self, msg: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x0 = msg["x0"].clone()
        out = decode_outputs(self.decoder, x0, msg["decode"].tolist())
        return {"x0": x0, "stage_s": msg["stage_s"].clone(), **out}
