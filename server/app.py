"""The FastAPI app: REST under /v1, WebRTC signalling, the WebSocket transport, SSE, metrics, page.

Every error a client can cause is a 4xx with a JSON body `{"error": code, "message": text}`; the
handlers below turn validation errors, unknown routes and session errors into that shape. Handlers
never touch tensors or block the event loop: engine calls go through `SessionManager`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollcast import __version__
from rollcast.server.metrics import CONTENT_TYPE
from rollcast.server.request_limits import BearerAuth, BodyLimit
from rollcast.server.runtime import Runtime
from rollcast.server.schemas import (
    Answer,
    ErrorBody,
    Offer,
    OneShotOffer,
    ParamsUpdate,
    SessionCreate,
    SessionCreated,
)
from rollcast.server.sessions import ServerSession, SessionError
from rollcast.server.webrtc import WebRTCTransport, configure_bitrate
from rollcast.server.websocket_transport import WebSocketSession

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 429, 503)}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _session_error(e: SessionError) -> JSONResponse:
    headers = {}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    body = {"error": e.code, "message": e.message, **e.extra}
    if e.retry_after_s is not None:
        body["retry_after_s"] = round(e.retry_after_s, 2)
    return JSONResponse(body, status_code=e.status, headers=headers)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def create_app(runtime: Runtime) -> FastAPI:
    manager = runtime.sessions
    webrtc = WebRTCTransport(manager, ice_servers=list(runtime.config.ice_servers))
    configure_bitrate(runtime.pipeline.resolution, runtime.pipeline.fps)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await manager.shutdown()
            await webrtc.shutdown()
            await asyncio.to_thread(runtime.stop)

    app = FastAPI(title="rollcast", version=__version__, lifespan=lifespan,
                  description="SLO-aware serving of streaming video diffusion: REST, WebRTC, WebSocket.")

    @app.exception_handler(SessionError)
    async def on_session_error(request: Request, e: SessionError) -> JSONResponse:
        return _session_error(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
        return _error(422, code, f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail),
                      headers=getattr(e, "headers", None))

    # -- health, metrics, models -------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
    async def readyz() -> Response:
        if runtime.ready:
            return JSONResponse({"ready": True})
        return _error(503, "not_ready", "the engine is not running")

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", tags=["models"])
    async def models() -> dict[str, Any]:
        p = runtime.pipeline
        w, h = p.resolution
        cfg = p.config
        return {"models": [{
            "id": cfg.name, "resolution": f"{w}x{h}", "fps": p.fps, "max_steps": manager.default_steps,
            "frames_per_block": p.runner.frames_per_block, "modes": ["t2v", "v2v"],
            "vae": p.spec.vae_kind, "cache_policy": p.runner.policy.name,
            "params": {
                "runtime": {"prompt": "string or [{text, weight}]", "transition_blocks": "int >= 0",
                            "steps": f"1..{manager.default_steps}", "paused": "bool"},
                "session": {"mode": "t2v | v2v", "seed": "int", "fps": "float", "slo": "ttff_ms, min_steps, "
                            "min_fps", "max_duration_s": f"<= {manager.defaults.max_duration_s}"},
                "load_time": {"model": cfg.name, "resolution": f"{w}x{h}", "vae": p.spec.vae_kind,
                              "cache_policy": p.runner.policy.name},
            }}]}

    @app.get("/v1/capacity", tags=["models"])
    async def capacity() -> dict[str, Any]:
        state = runtime.state()
        return {**state, "max_batch": runtime.config.max_batch,
                "max_sessions_per_client": manager.defaults.max_sessions_per_client,
                "max_duration_s": manager.defaults.max_duration_s,
                "max_utilization": runtime.config.admission.max_utilization}

    # -- sessions ---------------------------------------------------------------------------------

    def _created(s: ServerSession, queue_position: int | None, wait: float | None,
                 degraded: list[dict[str, object]]) -> SessionCreated:
        w, h = manager.resolution
        base = f"/v1/sessions/{s.session_id}"
        return SessionCreated(session_id=s.session_id, state="queued" if queue_position else "active",
                              queue_position=queue_position, estimated_wait_s=wait,
                              offer_url=f"{base}/offer", ws_url=f"{base}/ws", events_url=f"{base}/events",
                              fps=s.fps, steps=s.steps, resolution=f"{w}x{h}", degraded=degraded)

    async def _create(body: SessionCreate, request: Request) -> tuple[ServerSession, SessionCreated, int]:
        s, d = await manager.create(body, _client(request))
        degraded = [{"session_id": sid, "steps": steps} for sid, steps in d.degrade]
        if d.outcome == "queued":
            return s, _created(s, d.queue_position, d.estimated_wait_s, degraded), 202
        return s, _created(s, None, None, degraded), 201

    @app.post("/v1/sessions", tags=["sessions"], status_code=201,
              responses={202: {"model": SessionCreated}, **_ERRORS})
    async def create_session(body: SessionCreate, request: Request) -> JSONResponse:
        _, created, status = await _create(body, request)
        return JSONResponse(created.model_dump(), status_code=status)

    @app.get("/v1/sessions", tags=["sessions"])
    async def list_sessions(request: Request) -> dict[str, Any]:
        client = _client(request)
        return {"sessions": [s.describe() for s in manager.sessions.values() if s.client == client]}

    @app.get("/v1/sessions/{session_id}", tags=["sessions"], responses=_ERRORS)
    async def get_session(session_id: str) -> dict[str, Any]:
        return manager.get(session_id).describe()

    @app.patch("/v1/sessions/{session_id}/params", tags=["sessions"], responses=_ERRORS)
    async def update_params(session_id: str, body: ParamsUpdate) -> dict[str, Any]:
        s = manager.live(session_id)
        return {"session_id": session_id, **await manager.update_params(s, body)}

    @app.delete("/v1/sessions/{session_id}", tags=["sessions"], responses=_ERRORS)
    async def delete_session(session_id: str) -> dict[str, Any]:
        s = manager.get(session_id)
        await manager.close(s, "closed_by_client")
        return {"session_id": session_id, "state": s.state, "reason": s.reason}

    @app.post("/v1/sessions/{session_id}/offer", tags=["webrtc"], response_model=Answer, responses=_ERRORS)
    async def offer(session_id: str, body: Offer) -> Answer:
        s = manager.live(session_id)
        sdp = await webrtc.answer(s, body.sdp, body.type)
        return Answer(sdp=sdp, session_id=session_id)

    @app.post("/v1/webrtc/offer", tags=["webrtc"], status_code=201, response_model=Answer,
              responses={202: {"model": Answer}, **_ERRORS})
    async def one_shot_offer(body: OneShotOffer, request: Request) -> JSONResponse:
        if "m=video" not in body.sdp:
            raise SessionError(400, "invalid_sdp", "the offer has no video media section")
        s, _, status = await _create(body.session, request)
        try:
            sdp = await webrtc.answer(s, body.sdp, body.type)
        except SessionError:
            await manager.close(s, "bad_offer")
            raise
        return JSONResponse(Answer(sdp=sdp, session_id=s.session_id).model_dump(), status_code=status)

    @app.get("/v1/sessions/{session_id}/events", tags=["sessions"], responses=_ERRORS)
    async def events(session_id: str, request: Request) -> StreamingResponse:
        s = manager.get(session_id)
        q = s.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                yield f"event: state\ndata: {json.dumps(s.describe(), default=str)}\n\n"
                while True:
                    try:
                        msg = await asyncio.wait_for(q.get(), 15.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: {msg.get('type', 'message')}\ndata: {json.dumps(msg, default=str)}\n\n"
                    if msg.get("type") == "stream_stopped":
                        return
            finally:
                s.unsubscribe(q)

        if s.ended.is_set():
            s.unsubscribe(q)
            stopped = [m for m in s.history if m.get("type") == "stream_stopped"]
            body = "".join(f"event: stream_stopped\ndata: {json.dumps(m, default=str)}\n\n" for m in stopped)
            return StreamingResponse(iter([body]), media_type="text/event-stream")
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def websocket(ws: WebSocket, session_id: str) -> None:
        await ws.accept()
        try:
            s = manager.live(session_id)
            manager.attach(s, "ws")
        except SessionError as e:
            await ws.send_text(json.dumps({"type": "error", "error": e.code, "message": e.message}))
            await ws.close(code=4404 if e.status == 404 else 4409)
            return
        await WebSocketSession(manager, s, ws).run()

    # -- the page ---------------------------------------------------------------------------------

    static = resources.files("rollcast.server") / "static"
    with resources.as_file(static) as static_dir:
        app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.openapi()  # build the schema at start-up: a broken model fails here, not at /docs
    # Added last = outermost: auth first, then the body limit, then routing.
    app.add_middleware(BodyLimit, max_body_bytes=runtime.config.max_body_bytes)
    app.add_middleware(BearerAuth, api_key=runtime.config.api_key)
    return app
