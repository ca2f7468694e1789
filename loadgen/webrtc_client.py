"""A load-generator client over WebRTC (aiortc), the transport browsers use.

The video track carries no frame ids, so the client subscribes to them on the `control` data
channel (`frames.subscribe`: one `frame` message per sent frame, with its 90 kHz pts; frames sent
before the channel opened are replayed). Each decoded frame is timed on arrival with its RTP-derived
pts; afterwards pts are matched to the server's. aiortc's receiver counts pts from the first packet
it got, which is the first frame the server sent unless that was lost, so the two differ by one
constant offset: the one that matches the most frames, the earliest such (a regular stream fits
several equally well, and the first frame sent is by far the likeliest first packet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from rollcast.loadgen.frame_metrics import FrameArrival
from rollcast.loadgen.session_trace import SessionTrace, StreamError
from rollcast.loadgen.synthetic_video import MovingBarTrack

_DRAIN_S = 2.0
_OFFSET_CANDIDATES = 8  # server frames tried as the one the client's first decoded frame was


class _Receiver:
    """State shared by the peer connection's callbacks."""

    def __init__(self, trace: SessionTrace) -> None:
        self.trace = trace
        self.decoded: list[tuple[float, int]] = []  # (client time, client pts)
        self.server_frames: dict[int, tuple[int, bool]] = {}  # server pts -> (frame id, repeated)
        self.first_frame = asyncio.Event()
        self.stopped = asyncio.Event()
        self.recording = True

    def on_message(self, raw: str | bytes) -> None:
        msg = json.loads(raw)
        kind = str(msg.get("type"))
        if kind == "frame":
            self.server_frames[int(msg["pts"])] = (int(msg["frame_id"]), bool(msg["repeated"]))
            return
        self.trace.count_message(kind)
        if kind == "stream_stopped":
            self.trace.stop_reason = str(msg.get("reason"))
            self.stopped.set()

    async def read(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if self.recording:
                    self.decoded.append((time.monotonic(), int(frame.pts)))
                    self.first_frame.set()


def match_frames(decoded: list[tuple[float, int]], server_frames: dict[int, tuple[int, bool]]
                 ) -> tuple[list[FrameArrival], int]:
    """Decoded (time, client pts) -> FrameArrivals with the server's ids; and the unmatched count."""
    if not decoded or not server_frames:
        return [], len(decoded)
    first_pts = decoded[0][1]

    def hits(offset: int) -> int:
        return sum((pts - offset) in server_frames for _, pts in decoded)

    offsets = [first_pts - server_pts for server_pts in sorted(server_frames)[:_OFFSET_CANDIDATES]]
    best = max(offsets, key=hits)  # the first of equals: the earliest server frame
    frames = []
    for t, pts in decoded:
        hit = server_frames.get(pts - best)
        if hit is not None:
            frames.append(FrameArrival(t, *hit))
    return frames, len(decoded) - len(frames)


async def stream_webrtc(trace: SessionTrace, *, http: httpx.AsyncClient, offer_path: str, seconds: float,
                        first_frame_timeout_s: float, v2v: bool,
                        end_session: Callable[[], Awaitable[None]]) -> None:
    """Stream until `seconds` after the first decoded frame, then end the session and drain."""
    rx = _Receiver(trace)
    pc = RTCPeerConnection()
    readers: list[asyncio.Task[None]] = []
    try:
        channel = pc.createDataChannel("control")
        channel.on("open", lambda: channel.send(json.dumps({"type": "frames.subscribe"})))
        channel.on("message", rx.on_message)
        pc.on("track", lambda track: readers.append(asyncio.ensure_future(rx.read(track))))
        if v2v:
            assert trace.resolution is not None
            pc.addTrack(MovingBarTrack(*trace.resolution))
        else:
            pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())  # gathers ICE candidates: non-trickle
        await _negotiate(pc, http, offer_path)
        await _stream(rx, seconds, first_frame_timeout_s)
        if trace.stop_reason is None:
            await end_session()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rx.stopped.wait(), _DRAIN_S)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await pc.close()
    trace.frames, trace.unmatched_frames = match_frames(rx.decoded, rx.server_frames)


async def _negotiate(pc: RTCPeerConnection, http: httpx.AsyncClient, offer_path: str) -> None:
    offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
    try:
        r = await http.post(offer_path, json=offer)
    except httpx.HTTPError as e:
        raise StreamError("connect", f"POST {offer_path}: {type(e).__name__}: {e}") from e
    if r.status_code != 200:
        raise StreamError(f"offer_http_{r.status_code}", r.text)
    await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))


async def _stream(rx: _Receiver, seconds: float, first_frame_timeout_s: float) -> None:
    ended = asyncio.ensure_future(rx.stopped.wait())
    try:
        first = asyncio.ensure_future(rx.first_frame.wait())
        await asyncio.wait([first, ended], timeout=first_frame_timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if not rx.first_frame.is_set():
            if rx.stopped.is_set():
                return
            raise StreamError("no_first_frame", f"no frame within {first_frame_timeout_s:g} s of connecting")
        t_end = rx.decoded[0][0] + seconds
        await asyncio.wait([ended], timeout=max(0.0, t_end - time.monotonic()))
    finally:
        ended.cancel()
        rx.recording = False
