"""The `control` channel protocol, shared by the WebRTC data channel and the WebSocket transport.

Client -> server: typed JSON messages (`params.update`, `prompt.transition`, `cache.reset`, `pause`,
`resume`, `ping`, `frames.subscribe`), each with an optional `id`. Server -> client: an `ack` for
each (echoing `id` and `type`, with `applied_at_frame`: the first output frame the change affects)
or an `error` naming the problem; and unprompted `stats`, `degraded`/`recovered`, `first_frame`,
`stream_stopped`, and after `frames.subscribe` one `frame` message (frame id, pts, repeated) per
sent frame.
A bad message gets an error reply; it never closes the channel or touches the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from rollcast.server.schemas import (
    ControlEnvelope,
    ParamsUpdate,
    ParamsUpdateMessage,
    PromptTransitionMessage,
    SimpleMessage,
)
from rollcast.server.sessions import Message, ServerSession, SessionError, SessionManager

MAX_MESSAGE_BYTES = 16 * 1024
STATS_INTERVAL_S = 1.0


def _error(code: str, message: str, msg_id: object = None, for_type: object = None) -> Message:
    out: Message = {"type": "error", "error": code, "message": message}
    if msg_id is not None:
        out["id"] = msg_id
    if for_type is not None:
        out["for"] = for_type
    return out


def parse(raw: str | bytes) -> ControlEnvelope | Message:
    """The typed message, or the error reply for it."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return _error("message_too_large", f"control messages are limited to {MAX_MESSAGE_BYTES} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return _error("invalid_json", f"not JSON: {e}")
    msg_id = obj.get("id") if isinstance(obj, dict) else None
    msg_type = obj.get("type") if isinstance(obj, dict) else None
    try:
        return ControlEnvelope(message=obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = list(first["loc"][1:])
        if loc and loc[0] == msg_type:  # the union's tag: not a field the client wrote
            loc = loc[1:]
        where = ".".join(str(p) for p in loc) or "message"
        return _error("invalid_message", f"{where}: {first['msg']}", msg_id, msg_type)


async def handle(manager: SessionManager, session: ServerSession, raw: str | bytes,
                 send: Callable[[Message], None]) -> Message:
    """Parse and apply one control message arriving on the channel that `send` writes to; the reply
    to send back."""
    parsed = parse(raw)
    if isinstance(parsed, dict):
        manager.metrics.control_messages.labels("invalid", "error").inc()
        return parsed
    msg = parsed.message
    try:
        ack = await _apply(manager, session, msg, send)
    except SessionError as e:
        manager.metrics.control_messages.labels(msg.type, "error").inc()
        return _error(e.code, e.message, msg.id, msg.type)
    manager.metrics.control_messages.labels(msg.type, "ok").inc()
    out: Message = {"type": "ack", "for": msg.type, **ack}
    if msg.id is not None:
        out["id"] = msg.id
    return out


async def _apply(manager: SessionManager, session: ServerSession,
                 msg: ParamsUpdateMessage | PromptTransitionMessage | SimpleMessage,
                 send: Callable[[Message], None]) -> dict[str, Any]:
    if isinstance(msg, ParamsUpdateMessage):
        return await manager.update_params(session, msg.params)
    if isinstance(msg, PromptTransitionMessage):
        return await manager.update_params(
            session, ParamsUpdate(prompt=msg.prompt, transition_blocks=msg.blocks))
    if msg.type == "ping":
        return {"session_state": session.state}
    if msg.type == "frames.subscribe":
        return {"replayed": session.subscribe_frames(send)}
    if msg.type == "cache.reset":
        return {"applied_at_frame": await manager.reset_cache(session)}
    return await manager.update_params(session, ParamsUpdate(paused=msg.type == "pause"))


async def send_stats(manager: SessionManager, session: ServerSession, send: Any) -> None:
    """Every second until the session ends: a `stats` message (fps, ttff, jitter, drops)."""
    with contextlib.suppress(asyncio.CancelledError):
        while not session.ended.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.ended.wait(), STATS_INTERVAL_S)
            if session.ended.is_set():
                return
            send({"type": "stats", "session_id": session.session_id, "state": session.state,
                  "fps_target": session.fps, "steps": session.steps,
                  **session.stats.as_dict(session.fps)})
