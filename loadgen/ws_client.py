"""A load-generator client over the server's WebSocket frame transport.

Every binary message is one paced frame whose header carries the server's frame id and the
repeated flag; only the header is parsed (the pixels are not needed to time a frame). Text messages
are control messages, counted by type. v2v clients send the synthetic camera at the session's fps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from rollcast.loadgen.frame_metrics import FrameArrival
from rollcast.loadgen.session_trace import SessionTrace, StreamError
from rollcast.loadgen.synthetic_video import MovingBar
from rollcast.server.websocket_transport import FRAME_HEADER, FRAME_MAGIC, encode_frame

_DRAIN_S = 2.0  # after ending the session, how long to wait for its stream_stopped


def ws_url(base_url: str, path: str, api_key: str | None) -> str:
    url = base_url.replace("https://", "wss://").replace("http://", "ws://") + path
    return f"{url}?access_token={quote(api_key)}" if api_key else url


async def stream_ws(trace: SessionTrace, *, base_url: str, path: str, seconds: float,
                    first_frame_timeout_s: float, v2v: bool, api_key: str | None,
                    end_session: Callable[[], Awaitable[None]]) -> None:
    """Receive frames until `seconds` after the first one, then end the session and drain."""
    try:
        async with connect(ws_url(base_url, path, api_key), max_size=2**26, open_timeout=10) as ws:
            camera = asyncio.ensure_future(_camera(ws, trace)) if v2v else None
            try:
                await _receive(ws, trace, seconds, first_frame_timeout_s)
                if trace.stop_reason is None:
                    await end_session()
                    await _drain(ws, trace)
            finally:
                if camera is not None:
                    camera.cancel()
                    await asyncio.gather(camera, return_exceptions=True)
    except (OSError, InvalidHandshake, TimeoutError) as e:
        raise StreamError("connect", f"WebSocket {path}: {type(e).__name__}: {e}") from e


async def _receive(ws: ClientConnection, trace: SessionTrace, seconds: float, first_timeout_s: float) -> None:
    t_end = time.monotonic() + first_timeout_s  # until the first frame: the first-frame timeout
    while (left := t_end - time.monotonic()) > 0:
        try:
            raw = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        except ConnectionClosed as e:
            raise StreamError("disconnected", f"the server closed the WebSocket ({e})") from e
        now = time.monotonic()
        if isinstance(raw, bytes):
            if len(raw) < FRAME_HEADER.size or raw[:4] != FRAME_MAGIC:
                raise StreamError("bad_frame", f"a {len(raw)}-byte binary message is not an RCF1 frame")
            _magic, frame_id, _pts, _w, _h, flags = FRAME_HEADER.unpack_from(raw)
            if not trace.frames:
                t_end = now + seconds
            trace.frames.append(FrameArrival(now, frame_id, bool(flags & 1)))
        elif _on_text(trace, raw):
            return
    if not trace.frames:
        raise StreamError("no_first_frame", f"no frame within {first_timeout_s:g} s of connecting")


def _on_text(trace: SessionTrace, raw: str) -> bool:
    """Count one control message; True when it ends the stream."""
    msg = json.loads(raw)
    kind = str(msg.get("type"))
    trace.count_message(kind)
    if kind == "stream_stopped":
        trace.stop_reason = str(msg.get("reason"))
        return True
    return False


async def _drain(ws: ClientConnection, trace: SessionTrace) -> None:
    t_end = time.monotonic() + _DRAIN_S
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        while (left := t_end - time.monotonic()) > 0:
            raw = await asyncio.wait_for(ws.recv(), left)
            if isinstance(raw, str) and _on_text(trace, raw):
                return


async def _camera(ws: ClientConnection, trace: SessionTrace) -> None:
    assert trace.resolution is not None
    source = MovingBar(*trace.resolution)
    period = 1.0 / trace.fps
    t_next = time.monotonic()
    k = 0
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.send(encode_frame(k, 0, source.frame(k)))
            k += 1
            t_next += period
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))
