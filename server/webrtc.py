"""WebRTC with aiortc: one peer connection per session.

- Output: `GeneratedVideoTrack` plays the session's frame queue through a `Pacer` (90 kHz pts at the
  session's fps, a late chunk repeats the last frame rather than bursting).
- Input (v2v): the client's video track is read, sampled to the session's fps (extra frames dropped
  and counted), fitted to the model's resolution and pushed to the engine.
- Control: a data channel labelled `control` carries the typed messages of `server.control`.

Signalling is non-trickle: the answer is returned after ICE gathering, with all candidates in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from fractions import Fraction
from typing import Any

import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import h264, vpx
from aiortc.mediastreams import MediaStreamError

from rollcast.server import control
from rollcast.server.pacer import VIDEO_CLOCK_RATE, Pacer
from rollcast.server.sessions import Message, ServerSession, SessionError, SessionManager
from rollcast.server.video_input import InputSampler, fit_frame

log = logging.getLogger("rollcast.webrtc")
_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)


def configure_bitrate(resolution: tuple[int, int], fps: float) -> int:
    """Set aiortc's encoder bitrates for this resolution (its only knobs are module constants).

    About 0.2 bits per pixel per frame, the range where H.264/VP8 keep generated video's fine
    texture; REMB adapts between a quarter and twice that."""
    w, h = resolution
    target = int(min(12e6, max(300e3, 0.2 * w * h * fps)))
    for codec in (h264, vpx):
        codec.DEFAULT_BITRATE = target
        codec.MIN_BITRATE = max(100_000, target // 4)
        codec.MAX_BITRATE = target * 2
    return target


class GeneratedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, manager: SessionManager, session: ServerSession) -> None:
        super().__init__()
        self.manager = manager
        self.session = session
        self.pacer = Pacer(session.frames, session.fps)

    async def recv(self) -> av.VideoFrame:
        s = self.session
        self.pacer.set_fps(s.fps)
        paced = await self.pacer.next()
        if paced is None:
            self.stop()
            raise MediaStreamError
        self.manager.frame_sent(s, "webrtc", paced)
        frame = av.VideoFrame.from_ndarray(paced.frame.pixels, format="rgb24")
        frame.pts = paced.pts
        frame.time_base = _TIME_BASE
        return frame


_ICE_SCHEMES = ("stun", "stuns", "turn", "turns")


def ice_server(text: str) -> RTCIceServer:
    """`--ice-server`: `stun:HOST[:PORT]`, `turn:HOST[:PORT][?transport=udp|tcp]`, or with TURN
    credentials `turn:USER:CREDENTIAL@HOST[:PORT]` (the relay's long-term user; the URL handed
    to ICE is the part after `@`)."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in _ICE_SCHEMES or not rest:
        raise ValueError(f"ICE server must look like stun:HOST:PORT or turn:[USER:CREDENTIAL@]HOST:PORT, "
                         f"got {text!r}")
    if "@" not in rest:
        return RTCIceServer(urls=text)
    auth, _, host = rest.rpartition("@")
    user, colon, credential = auth.partition(":")
    if not scheme.startswith("turn") or not user or not colon or not credential or not host:
        raise ValueError(f"credentials go with TURN only, as turn:USER:CREDENTIAL@HOST:PORT; got {text!r}")
    return RTCIceServer(urls=f"{scheme}:{host}", username=user, credential=credential)


class WebRTCTransport:
    def __init__(self, manager: SessionManager, *, ice_servers: list[str] | None = None) -> None:
        self.manager = manager
        self.ice_servers = [ice_server(u) for u in (ice_servers or [])]
        self.peers: set[RTCPeerConnection] = set()

    async def answer(self, session: ServerSession, sdp: str, sdp_type: str) -> str:
        """Set up the session's peer connection from the client's offer; the answer SDP."""
        if "m=video" not in sdp:
            raise SessionError(400, "invalid_sdp", "the offer has no video media section")
        self.manager.attach(session, "webrtc")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        self.peers.add(pc)
        tasks: list[asyncio.Task[Any]] = []

        async def close_pc() -> None:
            for t in tasks:
                t.cancel()
            self.peers.discard(pc)
            await pc.close()

        session.closers.append(close_pc)
        self._wire(pc, session, tasks)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=sdp_type))
            pc.addTrack(GeneratedVideoTrack(self.manager, session))
            await pc.setLocalDescription(await pc.createAnswer())
        except SessionError:
            pc.remove_all_listeners("connectionstatechange")  # closing it must not end the session
            await self._fail(session, close_pc)
            raise
        except Exception as e:  # aiortc raises ValueError and friends on SDP it cannot use
            pc.remove_all_listeners("connectionstatechange")
            await self._fail(session, close_pc)
            raise SessionError(400, "invalid_sdp", f"could not use the offer: {type(e).__name__}: {e}") from e
        return pc.localDescription.sdp

    async def _fail(self, session: ServerSession, close_pc: Any) -> None:
        session.transport = None  # the client may try again with a better offer
        with contextlib.suppress(ValueError):
            session.closers.remove(close_pc)
        await close_pc()

    def _wire(self, pc: RTCPeerConnection, session: ServerSession, tasks: list[asyncio.Task[Any]]) -> None:
        manager = self.manager

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and session.active:
                await manager.close(session, "client_disconnected")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and session.request.mode == "v2v":
                tasks.append(asyncio.ensure_future(self._read_input(session, track)))

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            if channel.label != "control":
                return

            def send(message: Message) -> None:
                if channel.readyState == "open":
                    channel.send(json.dumps(message, default=str))

            session.add_sender(send)
            tasks.append(asyncio.ensure_future(control.send_stats(manager, session, send)))

            @channel.on("message")
            async def on_message(raw: str | bytes) -> None:
                send(await control.handle(manager, session, raw, send))

    async def _read_input(self, session: ServerSession, track: MediaStreamTrack) -> None:
        sampler = InputSampler(session.fps)
        size = self.manager.resolution
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while session.active:
                frame = await track.recv()
                if not sampler.keep(time.monotonic()):
                    self.manager.input_dropped(session)
                    continue
                rgb = fit_frame(frame.to_ndarray(format="rgb24"), size)
                try:
                    await self.manager.push_input(session, rgb[None])
                except (KeyError, ValueError) as e:
                    log.info("session %s: input ignored: %s", session.session_id, e)
                    return

    async def shutdown(self) -> None:
        await asyncio.gather(*(pc.close() for pc in list(self.peers)), return_exceptions=True)
        self.peers.clear()
