"""Shared pieces of the server tests: a tiny-model serving config and small clients."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rollcast.scheduler.admission import AdmissionConfig
from rollcast.scheduler.cost_model import CostModel
from rollcast.server.runtime import ServeConfig
from rollcast.server.sessions import SessionDefaults
from rollcast.server.websocket_transport import decode_frame, encode_frame
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.video_pipeline import PipelineSpec

SIZE = (64, 64)


def fixed_cost_model(path: Path) -> Path:
    """An optimistic tiny cost model file, for servers that must not depend on start-up profiling:
    on a busy 2-core machine the profile can predict more than a whole server for one session, and
    then every create is a (legitimate) 503 slo_infeasible."""
    CostModel.for_model(ModelConfig.preset("tiny"), name="tiny-fixed", peak_flops=1e13, half_tokens=200.0,
                        overhead_s=0.001, decode_s_per_latent_frame=0.0005).save(path)
    return path


def tiny_serve_config(**overrides: Any) -> ServeConfig:
    worker = WorkerSpec(config=ModelConfig.preset("tiny"), policy=CachePolicy.preset("self-forcing"),
                        sampler=SamplerConfig.preset("self-forcing"), resolution=SIZE, max_sessions=10)
    sessions = overrides.pop("sessions", SessionDefaults(ttff_s=3.0, max_sessions_per_client=10,
                                                         connect_timeout_s=20.0, max_duration_s=60.0))
    base = {"pipeline": PipelineSpec(worker=worker), "host": "127.0.0.1", "port": 0, "sessions": sessions,
            "admission": AdmissionConfig(max_utilization=1.0)}
    return ServeConfig(**{**base, **overrides})


@dataclass
class WSResult:
    frames: list[tuple[int, float, bool]] = field(default_factory=list)  # (frame id, t, repeated)
    pixels: dict[int, np.ndarray] = field(default_factory=dict)  # by frame id
    messages: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]


async def ws_session(base_url: str, session_id: str, seconds: float, *, send: list[tuple[float, dict]] = (),
                     input_fps: float | None = None, size: tuple[int, int] = SIZE,
                     close: bool = True) -> WSResult:
    """Read frames and messages for `seconds`; send each control message at its time; with
    `input_fps`, stream synthetic input frames (v2v)."""
    url = base_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws"
    out = WSResult()
    t0 = time.monotonic()
    async with connect(url, max_size=2**24) as ws:
        async def sender() -> None:
            for at, msg in sorted(send, key=lambda x: x[0]):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                await ws.send(json.dumps(msg))

        async def camera() -> None:
            w, h = size
            k = 0
            while True:
                img = np.zeros((h, w, 3), np.uint8)
                img[:, (k * 2) % w] = 255  # a moving bar
                await ws.send(encode_frame(k, 0, img))
                k += 1
                await asyncio.sleep(1.0 / input_fps)  # type: ignore[operator]

        tasks = [asyncio.ensure_future(sender())]
        if input_fps:
            tasks.append(asyncio.ensure_future(camera()))
        try:
            while time.monotonic() - t0 < seconds:
                try:
                    raw = await asyncio.wait_for(ws.recv(), max(0.01, seconds - (time.monotonic() - t0)))
                except (TimeoutError, ConnectionClosed):
                    break
                if isinstance(raw, bytes):
                    f = decode_frame(raw)
                    out.frames.append((f.frame_id, time.monotonic(), f.repeated))
                    out.pixels[f.frame_id] = f.pixels
                else:
                    msg = json.loads(raw)
                    out.messages.append(msg)
                    if msg.get("type") == "stream_stopped":
                        break
        finally:
            for t in tasks:
                t.cancel()
    if close:
        async with httpx.AsyncClient(base_url=base_url) as http:
            await http.delete(f"/v1/sessions/{session_id}")
    return out


def create(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/sessions", json={"prompt": "a red circle", **body})
