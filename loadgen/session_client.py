"""One load-generator session from request to end, as a real client lives it:

POST /v1/sessions (timed: TTFF counts from here) -> 201 admitted or 202 queued (both connect at
once; a queued session's frames flow when it is admitted), 503/429 rejected -> stream over the
chosen transport for `session_seconds` after the first frame -> DELETE -> GET the session for the
server's own view (admission wait, frames generated). Failures are recorded on the trace by kind;
one session's failure never stops the others.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from rollcast.loadgen.load_config import LoadConfig
from rollcast.loadgen.session_trace import SessionTrace, StreamError
from rollcast.loadgen.webrtc_client import stream_webrtc
from rollcast.loadgen.ws_client import stream_ws


async def run_session(trace: SessionTrace, cfg: LoadConfig, http: httpx.AsyncClient) -> None:
    trace.t_request = time.monotonic()
    try:
        r = await http.post("/v1/sessions", json=cfg.session_body(trace.index))
    except httpx.HTTPError as e:
        trace.fail("connect", f"POST /v1/sessions: {type(e).__name__}: {e}")
        return
    trace.http_status = r.status_code
    if r.status_code in (429, 503):
        trace.outcome = "rejected"
        trace.reject_reason = _error_code(r)
        return
    if r.status_code not in (201, 202):
        trace.fail(f"http_{r.status_code}", r.text)
        return
    created = r.json()
    trace.session_id = created["session_id"]
    trace.admission = "admitted" if r.status_code == 201 else "queued"
    trace.fps = float(created["fps"])
    w, h = (int(v) for v in created["resolution"].split("x"))
    trace.resolution = (w, h)
    deleted = False

    async def end_session() -> None:
        nonlocal deleted
        deleted = True
        await _delete(http, trace)

    try:
        await _stream(trace, cfg, http, created, end_session)
    except StreamError as e:
        trace.fail(e.kind, str(e))
    finally:
        if not deleted:
            await _delete(http, trace)
        await _read_server_view(http, trace)
    if trace.outcome == "pending":
        if trace.stop_reason not in (None, "closed_by_client"):
            trace.fail("stream_stopped", f"the server ended the stream early: {trace.stop_reason}")
        else:
            trace.outcome = "completed"


async def _stream(trace: SessionTrace, cfg: LoadConfig, http: httpx.AsyncClient,
                  created: dict[str, Any], end_session: Callable[[], Awaitable[None]]) -> None:
    common = {"seconds": cfg.session_seconds, "first_frame_timeout_s": cfg.first_frame_timeout_s,
              "v2v": cfg.mode == "v2v", "end_session": end_session}
    if cfg.transport == "ws":
        await stream_ws(trace, base_url=cfg.url, path=created["ws_url"], api_key=cfg.api_key, **common)
    else:
        await stream_webrtc(trace, http=http, offer_path=created["offer_url"], **common)


async def _delete(http: httpx.AsyncClient, trace: SessionTrace) -> None:
    try:
        await http.delete(f"/v1/sessions/{trace.session_id}")
    except httpx.HTTPError as e:
        if trace.outcome == "pending":
            trace.fail("delete", f"DELETE /v1/sessions/{trace.session_id}: {type(e).__name__}: {e}")


async def _read_server_view(http: httpx.AsyncClient, trace: SessionTrace) -> None:
    try:
        r = await http.get(f"/v1/sessions/{trace.session_id}")
    except httpx.HTTPError:
        return  # the server's view is extra detail; the client's own record stands without it
    if r.status_code == 200:
        trace.server_stats = r.json()


def _error_code(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", f"http_{r.status_code}"))
    except ValueError:
        return f"http_{r.status_code}"
