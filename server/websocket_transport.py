"""A WebSocket frame transport for clients without WebRTC (scripts, tests, the load generator).

`GET /v1/sessions/{id}/ws` upgrades to a WebSocket that carries:
- server -> client binary messages: one paced frame each, `FRAME_HEADER` then raw RGB24 bytes;
- server -> client text messages: the same JSON messages as the WebRTC `control` channel
  (acks, errors, stats, degraded, stream_stopped);
- client -> server text: control messages; client -> server binary (v2v): input frames in the same
  binary layout at the model's resolution.

The pacing, frame ids and freeze rule are the WebRTC track's, so both transports deliver the same
frames at the same times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from dataclasses import dataclass

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from rollcast.server import control
from rollcast.server.pacer import Pacer
from rollcast.server.sessions import Message, ServerSession, SessionError, SessionManager
from rollcast.server.video_input import InputSampler

# magic, frame id, pts (90 kHz), width, height, flags (bit 0: repeated frame)
FRAME_HEADER = struct.Struct("<4sQqHHB")
FRAME_MAGIC = b"RCF1"
_OUTBOX = 64  # pending outgoing messages; frames beyond it are dropped (a slow reader)


@dataclass(frozen=True)
class WireFrame:
    frame_id: int
    pts: int
    repeated: bool
    pixels: np.ndarray  # uint8 [H, W, 3]


def encode_frame(frame_id: int, pts: int, pixels: np.ndarray, *, repeated: bool = False) -> bytes:
    h, w = pixels.shape[:2]
    header = FRAME_HEADER.pack(FRAME_MAGIC, frame_id, pts, w, h, int(repeated))
    return header + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()


def decode_frame(data: bytes) -> WireFrame:
    """Parse one binary frame message; ValueError naming what is wrong."""
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"frame message of {len(data)} bytes is shorter than its "
                         f"{FRAME_HEADER.size}-byte header")
    magic, frame_id, pts, w, h, flags = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError(f"frame message starts with {magic!r}, expected {FRAME_MAGIC!r}")
    expected = FRAME_HEADER.size + w * h * 3
    if len(data) != expected or w == 0 or h == 0:
        raise ValueError(f"a {w}x{h} RGB frame message has {expected} bytes, got {len(data)}")
    pixels = np.frombuffer(data, np.uint8, offset=FRAME_HEADER.size).reshape(h, w, 3)
    return WireFrame(frame_id, pts, bool(flags & 1), pixels)


class WebSocketSession:
    def __init__(self, manager: SessionManager, session: ServerSession, ws: WebSocket) -> None:
        self.manager = manager
        self.session = session
        self.ws = ws
        self.outbox: asyncio.Queue[bytes | str | None] = asyncio.Queue(maxsize=_OUTBOX)
        self.sampler = InputSampler(session.fps)

    def send_message(self, message: Message) -> None:
        self._put(json.dumps(message, default=str), control=True)

    def _put(self, item: bytes | str | None, *, control: bool) -> None:
        if self.outbox.full():
            if not control:
                self.manager.metrics.drops.labels("websocket").inc()
                return
            with contextlib.suppress(asyncio.QueueEmpty):
                self.outbox.get_nowait()  # a control message outranks the oldest pending item
        self.outbox.put_nowait(item)

    async def run(self) -> None:
        s = self.session
        s.add_sender(self.send_message)
        tasks = [asyncio.ensure_future(c) for c in (
            self._frames(), self._writer(), self._reader(),
            control.send_stats(self.manager, s, self.send_message))]
        try:
            await asyncio.wait(tasks[:3], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            s.remove_sender(self.send_message)
            if s.active:
                await self.manager.close(s, "client_disconnected")
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def _frames(self) -> None:
        s = self.session
        pacer = Pacer(s.frames, s.fps)
        while True:
            pacer.set_fps(s.fps)
            paced = await pacer.next()
            if paced is None:
                break
            self.manager.frame_sent(s, "ws", paced)
            f = paced.frame
            self._put(encode_frame(f.frame_id, paced.pts, f.pixels, repeated=paced.repeated), control=False)
        await s.ended.wait()  # let stream_stopped go out after the last frame
        await asyncio.sleep(0.05)
        self._put(None, control=True)

    async def _writer(self) -> None:
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            if isinstance(item, bytes):
                await self.ws.send_bytes(item)
            else:
                await self.ws.send_text(item)

    async def _reader(self) -> None:
        s = self.session
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    self.send_message(await control.handle(self.manager, s, msg["text"], self.send_message))
                elif msg.get("bytes") is not None:
                    await self._input(msg["bytes"])

    async def _input(self, data: bytes) -> None:
        s = self.session
        if s.request.mode != "v2v":
            self.send_message({"type": "error", "error": "not_v2v",
                               "message": "this is a text-to-video session; it takes no input frames"})
            return
        try:
            frame = decode_frame(data)
            w, h = self.manager.resolution
            if frame.pixels.shape[:2] != (h, w):
                raise ValueError(f"input frames must be {w}x{h}, got "
                                 f"{frame.pixels.shape[1]}x{frame.pixels.shape[0]}")
        except ValueError as e:
            self.send_message({"type": "error", "error": "invalid_frame", "message": str(e)})
            return
        if not self.sampler.keep(time.monotonic()):
            self.manager.input_dropped(s)
            return
        try:
            await self.manager.push_input(s, frame.pixels[None])
        except (KeyError, ValueError, SessionError) as e:
            self.send_message({"type": "error", "error": "input_refused", "message": str(e)})
