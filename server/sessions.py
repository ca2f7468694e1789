"""Server-side sessions: the bridge between HTTP/WebRTC clients and the engine.

The engine runs on its own thread and reports through events; this module turns them into what a
client sees: frames in a bounded newest-wins queue, messages on the session's control channel and
SSE stream, per-session stats, metrics. Every engine call from the event loop goes through a worker
thread (`asyncio.to_thread`) so that prompt encoding or admission never stalls frame pacing.

Session lifecycle: requested -> active | queued -> active -> finished | failed; or rejected.
An admitted session that no client connects to within `connect_timeout_s` is closed, and every
session ends at its maximum duration, so nothing is left running for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollcast.scheduler.admission import AdmissionDecision
from rollcast.scheduler.engine import Engine
from rollcast.scheduler.events import EngineEvent
from rollcast.scheduler.replica_set import ReplicaSet
from rollcast.scheduler.session import SessionRequest, SessionSLO
from rollcast.server.frame_queue import Frame, FrameQueue
from rollcast.server.metrics import ServerMetrics
from rollcast.server.pacer import PacedFrame
from rollcast.server.schemas import ParamsUpdate, SessionCreate

Message = dict[str, Any]
_ENDED = ("finished", "failed", "rejected")


class SessionError(Exception):
    """A client-facing failure: HTTP status, stable code, message (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after_s: float | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.extra = extra or {}


@dataclass(frozen=True)
class SessionDefaults:
    """Server-wide defaults and limits for sessions (the CLI fills them)."""

    ttff_s: float = 2.0
    fps: float | None = None  # None: the model's
    steps: int | None = None  # None: the sampler's
    min_steps: int | None = 1  # sessions may degrade to one step unless they ask otherwise
    max_duration_s: float = 600.0
    max_sessions_per_client: int = 4
    connect_timeout_s: float = 30.0
    # Frames buffered per session beyond its TTFF before the oldest are dropped (the engine's
    # max_lead_s of 1 s plus a chunk arriving whole).
    output_queue_s: float = 2.0


@dataclass
class SessionStats:
    t_request: float
    t_admitted: float | None = None
    t_first_frame: float | None = None
    frames_sent: int = 0
    frames_generated: int = 0
    last_sent: float | None = None
    intervals: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    freezes: int = 0
    repeated_frames: int = 0
    dropped_output: int = 0
    dropped_input: int = 0
    deadline_misses: int = 0
    in_freeze: bool = False

    def as_dict(self, fps: float) -> dict[str, Any]:
        iv = np.asarray(self.intervals, dtype=np.float64)
        pct = {f"frame_interval_p{q}_ms": round(float(np.percentile(iv, q)) * 1e3, 2) if iv.size else None
               for q in (50, 95, 99)}
        jitter = (round(float(np.percentile(np.abs(iv - 1.0 / fps), 99)) * 1e3, 2) if iv.size else None)
        span = (self.last_sent - self.t_first_frame) if self.last_sent and self.t_first_frame else 0.0
        return {
            "ttff_ms": (round((self.t_first_frame - self.t_request) * 1e3, 1)
                        if self.t_first_frame is not None else None),
            "queue_wait_ms": (round((self.t_admitted - self.t_request) * 1e3, 1)
                              if self.t_admitted is not None else None),
            "frames_sent": self.frames_sent, "frames_generated": self.frames_generated,
            "fps": round((self.frames_sent - 1) / span, 2) if span > 0 else None,
            **pct, "jitter_p99_ms": jitter, "freezes": self.freezes,
            "repeated_frames": self.repeated_frames,
            "dropped": {"output": self.dropped_output, "input": self.dropped_input},
            "deadline_misses": self.deadline_misses,
        }


class ServerSession:
    """One stream as the server holds it. Mutated on the event loop only."""

    def __init__(self, session_id: str, client: str, request: SessionRequest, frames: FrameQueue,
                 t_request: float) -> None:
        self.session_id = session_id
        self.client = client
        self.request = request
        self.frames = frames
        self.state = "requested"
        self.reason: str | None = None
        self.fps = request.slo.fps
        self.steps = request.steps
        self.stats = SessionStats(t_request)
        self.transport: str | None = None  # "webrtc" | "ws" once a client attached
        self.paused = False
        self._subscribers: list[asyncio.Queue[Message]] = []
        self._senders: list[Callable[[Message], None]] = []  # control-channel writers
        self.history: deque[Message] = deque(maxlen=64)  # recent messages for late SSE subscribers
        # Sent frames' (frame id, pts, repeated), replayed to a `frames.subscribe` that comes after
        # the first frames (a WebRTC data channel opens after the video may have started).
        self.sent_frames: deque[Message] = deque(maxlen=256)
        self._frame_listeners: list[Callable[[Message], None]] = []
        self.closers: list[Callable[[], Any]] = []  # transport cleanups run at the end
        self.ended = asyncio.Event()

    @property
    def active(self) -> bool:
        return self.state in ("active", "queued")

    def publish(self, message: Message) -> None:
        """To every SSE subscriber and control channel (newest-wins for slow SSE readers)."""
        self.history.append(message)
        for q in self._subscribers:
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(message)
        for send in list(self._senders):
            send(message)

    def subscribe(self) -> asyncio.Queue[Message]:
        q: asyncio.Queue[Message] = asyncio.Queue(maxsize=256)
        for m in self.history:
            q.put_nowait(m)
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Message]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(q)

    def add_sender(self, send: Callable[[Message], None]) -> None:
        self._senders.append(send)

    def remove_sender(self, send: Callable[[Message], None]) -> None:
        with contextlib.suppress(ValueError):
            self._senders.remove(send)
        with contextlib.suppress(ValueError):
            self._frame_listeners.remove(send)

    def subscribe_frames(self, send: Callable[[Message], None]) -> int:
        """Send a `frame` message per sent frame to `send` from now on, after replaying the recent
        ones; returns how many were replayed. WebRTC carries no frame ids in the video itself."""
        for m in self.sent_frames:
            send(m)
        if send not in self._frame_listeners:
            self._frame_listeners.append(send)
        return len(self.sent_frames)

    def note_frame_sent(self, frame_id: int, pts: int, repeated: bool) -> None:
        message: Message = {"type": "frame", "frame_id": frame_id, "pts": pts, "repeated": repeated}
        self.sent_frames.append(message)
        for send in list(self._frame_listeners):
            send(message)

    def describe(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "state": self.state, "reason": self.reason,
                "mode": self.request.mode, "fps": self.fps, "steps": self.steps, "paused": self.paused,
                "transport": self.transport, "stats": self.stats.as_dict(self.fps)}


class SessionManager:
    def __init__(self, engine: Engine | ReplicaSet, *, metrics: ServerMetrics, defaults: SessionDefaults,
                 model_fps: float, default_steps: int, resolution: tuple[int, int]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.defaults = defaults
        self.model_fps = model_fps
        self.default_steps = default_steps
        self.resolution = resolution
        self.sessions: dict[str, ServerSession] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._closing = False

    # -- creation ---------------------------------------------------------------------------------

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def _request(self, sid: str, body: SessionCreate) -> SessionRequest:
        d = self.defaults
        size = body.size()
        if size is not None and size != self.resolution:
            w, h = self.resolution
            raise SessionError(422, "unsupported_resolution",
                               f"this server generates {w}x{h}; got {body.resolution}")
        fps = body.fps or d.fps or self.model_fps
        steps = body.steps or d.steps or self.default_steps
        if steps > self.default_steps:
            raise SessionError(422, "invalid_steps",
                               f"steps must lie in [1, {self.default_steps}] for this model, got {steps}")
        min_steps = body.slo.min_steps if body.slo.min_steps is not None else d.min_steps
        min_steps = min(min_steps, steps) if min_steps is not None else None
        if body.slo.min_fps is not None and body.slo.min_fps > fps:
            raise SessionError(422, "invalid_slo", f"slo.min_fps {body.slo.min_fps} exceeds fps {fps}")
        duration = min(body.max_duration_s or d.max_duration_s, d.max_duration_s)
        prompt = body.prompt if isinstance(body.prompt, str) else [(p.text, p.weight) for p in body.prompt]
        slo = SessionSLO(ttff_s=(body.slo.ttff_ms / 1e3) if body.slo.ttff_ms else d.ttff_s, fps=fps,
                         min_steps=min_steps, min_fps=body.slo.min_fps)
        return SessionRequest(sid, mode=body.mode, prompt=prompt, seed=body.seed,  # type: ignore[arg-type]
                              steps=steps, slo=slo, duration_s=duration, resolution=self.resolution)

    async def create(self, body: SessionCreate, client: str) -> tuple[ServerSession, AdmissionDecision]:
        if self._closing:
            raise SessionError(503, "shutting_down", "the server is shutting down")
        mine = sum(1 for s in self.sessions.values() if s.client == client and s.active)
        if mine >= self.defaults.max_sessions_per_client:
            raise SessionError(429, "too_many_sessions",
                               f"this client already has {mine} sessions (limit "
                               f"{self.defaults.max_sessions_per_client}); close one first",
                               retry_after_s=5.0)
        sid = f"s{next(self._ids)}-{secrets.token_hex(6)}"
        request = self._request(sid, body)
        assert self.loop is not None
        # The engine runs up to ttff + 1 s ahead of deadlines; the queue holds that plus a chunk.
        capacity = max(2, round((request.slo.ttff_s + self.defaults.output_queue_s) * request.slo.fps))
        session = ServerSession(sid, client, request, FrameQueue(capacity, self.loop), time.monotonic())
        self.sessions[sid] = session
        # Executor refusals (no cache row, a setup it cannot run) come back as rejections.
        decision = await asyncio.to_thread(self.engine.open_session, request)
        if decision.outcome == "rejected" and decision.reason == "unsupported":
            self.sessions.pop(sid, None)
            raise SessionError(422, "unsupported", f"this server cannot run that session: {decision.detail}")
        if decision.outcome == "rejected":
            self.sessions.pop(sid, None)
            raise SessionError(503, decision.reason or "capacity_exhausted",
                               _rejection_message(decision), retry_after_s=decision.retry_after_s or 5.0,
                               extra={"predicted_load": round(decision.predicted_load, 3)})
        if session.state == "requested":  # the admitted/queued event may have arrived already
            session.state = "active" if decision.outcome == "admitted" else "queued"
        self.loop.call_later(self.defaults.connect_timeout_s, self._connect_timeout, sid)
        return session, decision

    def get(self, session_id: str) -> ServerSession:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionError(404, "unknown_session", f"no session {session_id!r}")
        return s

    def live(self, session_id: str) -> ServerSession:
        s = self.get(session_id)
        if not s.active:
            raise SessionError(409, "session_ended", f"session {session_id} has ended ({s.state})")
        return s

    # -- engine events (engine thread) -------------------------------------------------------------

    def on_engine_event(self, e: EngineEvent) -> None:
        self.metrics.on_engine_event(e)
        session = self.sessions.get(e.session_id)
        if session is None or self.loop is None:
            return
        if e.kind == "frames_ready" and e.data.get("frames") is not None:
            pixels = e.data["frames"]
            first = int(e.data["first_frame"])
            now = time.monotonic()
            dropped = session.frames.put_many([Frame(first + i, pixels[i], now) for i in range(len(pixels))])
            if dropped:
                self.metrics.drops.labels("output").inc(dropped)
        data = {k: v for k, v in e.data.items() if k != "frames"}
        self._call(self._on_event, session, e.kind, e.t, data)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_event(self, s: ServerSession, kind: str, t: float, data: dict[str, Any]) -> None:
        st = s.stats
        if kind == "admitted":
            s.state = "active"
            st.t_admitted = t
            wait_ms = round(float(data.get("wait_s", 0)) * 1e3, 1)
            self.publish(s, {"type": "admitted", "queue_wait_ms": wait_ms})
        elif kind == "queued":
            s.state = "queued"
            self.publish(s, {"type": "queued", "queue_position": data.get("position"),
                             "estimated_wait_s": data.get("estimated_wait_s")})
        elif kind == "frames_ready":
            st.frames_generated += int(data.get("num_frames", 0))
        elif kind == "deadline_miss":
            st.deadline_misses += 1
        elif kind in ("degraded", "recovered"):
            what, new = data.get("what"), data.get("new")
            if what == "steps":
                s.steps = int(new)  # type: ignore[arg-type]
            elif what == "fps":
                s.fps = float(new)  # type: ignore[arg-type]
            message = {"type": kind, "what": what, "old": data.get("old"), "new": new}
            if "reason" in data:  # e.g. what: pipeline, a stage died
                message["reason"] = data["reason"]
            self.publish(s, message)
        elif kind in _ENDED:
            self._finish(s, kind, str(data.get("reason") or kind))

    def publish(self, s: ServerSession, message: Message) -> None:
        s.publish({"session_id": s.session_id, **message})

    # -- transports report ---------------------------------------------------------------------------

    def frame_sent(self, s: ServerSession, transport: str, paced: PacedFrame) -> None:
        t_sent, repeated = paced.t_sent, paced.repeated
        s.note_frame_sent(paced.frame.frame_id, paced.pts, repeated)
        st = s.stats
        if st.t_first_frame is None:
            st.t_first_frame = t_sent
            self.metrics.ttff.observe(t_sent - st.t_request)
            self.publish(s, {"type": "first_frame", "ttff_ms": round((t_sent - st.t_request) * 1e3, 1)})
        elif st.last_sent is not None:
            st.intervals.append(t_sent - st.last_sent)
            self.metrics.frame_interval.observe(t_sent - st.last_sent)
        st.last_sent = t_sent
        st.frames_sent += 1
        self.metrics.frames_sent.labels(transport).inc()
        if repeated and not s.paused:  # a paused stream holds its picture on purpose
            st.repeated_frames += 1
            self.metrics.repeated_frames.inc()
            if not st.in_freeze:
                st.freezes += 1
                self.metrics.freezes.inc()
        st.in_freeze = repeated and not s.paused

    def input_dropped(self, s: ServerSession, n: int = 1) -> None:
        s.stats.dropped_input += n
        self.metrics.drops.labels("input").inc(n)

    def attach(self, s: ServerSession, transport: str) -> None:
        if s.transport is not None:
            raise SessionError(409, "already_connected", f"session {s.session_id} already has a "
                               f"{s.transport} client")
        if not s.active:
            raise SessionError(409, "session_ended", f"session {s.session_id} has ended ({s.state})")
        s.transport = transport

    async def push_input(self, s: ServerSession, frames: np.ndarray) -> None:
        """v2v input frames uint8 [T, H, W, 3] at the model's resolution."""
        await asyncio.to_thread(self.engine.push_input, s.session_id, frames)

    # -- control ----------------------------------------------------------------------------------

    async def update_params(self, s: ServerSession, params: ParamsUpdate) -> dict[str, Any]:
        """Apply a params update; returns the ack fields (the frame id at which it takes effect)."""
        if not s.active:
            raise SessionError(409, "session_ended", f"session {s.session_id} has ended ({s.state})")
        applied: dict[str, Any] = {}
        if params.steps is not None:
            if params.steps > s.request.steps:
                raise SessionError(422, "invalid_steps",
                                   f"steps must lie in [1, {s.request.steps}] for this session")
            frame = await self._engine_call(self.engine.set_steps, s.session_id, params.steps)
            applied["steps"] = params.steps
            applied["applied_at_frame"] = frame
        if params.prompt is not None:
            prompt = params.prompt if isinstance(params.prompt, str) else [
                (p.text, p.weight) for p in params.prompt]
            frame = await self._engine_call(self.engine.set_prompt, s.session_id, prompt,
                                            params.transition_blocks)
            applied["prompt"] = True
            applied["applied_at_frame"] = frame
        if params.paused is not None:
            frame = await self._engine_call(self.engine.set_paused, s.session_id, params.paused)
            s.paused = params.paused
            applied["paused"] = params.paused
            applied.setdefault("applied_at_frame", frame)
        if not applied:
            raise SessionError(422, "empty_update", "params update names nothing to change")
        if "steps" in applied:
            s.steps = params.steps  # type: ignore[assignment]
        return applied

    async def reset_cache(self, s: ServerSession) -> int:
        raise SessionError(422, "not_supported", "cache.reset is not supported by this server yet; "
                           "close the session and open a new one")

    async def _engine_call(self, fn: Callable[..., int], *args: Any) -> int:
        try:
            return await asyncio.to_thread(fn, *args)
        except KeyError as e:
            raise SessionError(409, "session_not_running", f"session is not running: {e}") from e
        except ValueError as e:
            raise SessionError(422, "invalid_params", str(e)) from e

    # -- ending -----------------------------------------------------------------------------------

    async def close(self, s: ServerSession, reason: str = "closed_by_client") -> None:
        if s.active:
            with contextlib.suppress(KeyError):
                await asyncio.to_thread(self.engine.close_session, s.session_id, reason)
            self._finish(s, "finished", reason)
        await self._run_closers(s)

    def _finish(self, s: ServerSession, state: str, reason: str) -> None:
        if s.ended.is_set():
            return
        s.state = state
        s.reason = reason
        s.frames.close()
        self.publish(s, {"type": "stream_stopped", "state": state, "reason": reason,
                         "stats": s.stats.as_dict(s.fps)})
        s.ended.set()
        assert self.loop is not None
        self.loop.create_task(self._run_closers(s))
        # Ended sessions stay queryable for a while, then go.
        self.loop.call_later(300.0, self.sessions.pop, s.session_id, None)

    async def _run_closers(self, s: ServerSession) -> None:
        closers, s.closers = s.closers, []
        for close in closers:
            with contextlib.suppress(Exception):
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    def _connect_timeout(self, sid: str) -> None:
        s = self.sessions.get(sid)
        if s is not None and s.active and s.transport is None:
            assert self.loop is not None
            self.loop.create_task(self.close(s, "no_client_connected"))

    async def shutdown(self) -> None:
        """End every session with a `stream_stopped` message (server shutdown)."""
        self._closing = True
        for s in list(self.sessions.values()):
            if s.active:
                await self.close(s, "server_shutdown")

    # -- views -------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = {"active": 0, "queued": 0}
        for s in self.sessions.values():
            if s.state in out:
                out[s.state] += 1
        return out


def _rejection_message(d: AdmissionDecision) -> str:
    if d.reason == "slo_infeasible":
        return "the requested SLO cannot be met by this server even when idle (ask for a longer ttff)"
    return "no capacity for another session now; retry later"
