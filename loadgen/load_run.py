"""A load-generator run: sessions arrive by a seeded Poisson or gamma process for `duration_s`, each
runs as a real client (`session_client`), at most `max_concurrency` at a time (an arrival beyond it
waits for a slot, as in vLLM's serving benchmark). The run ends when the last session has ended;
every session is bounded by its first-frame timeout plus its length, so the run stops by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from rollcast.loadgen.load_config import LoadConfig
from rollcast.loadgen.session_client import run_session
from rollcast.loadgen.session_trace import SessionTrace


class LoadgenError(Exception):
    """The run cannot start (e.g. the server is unreachable)."""


@dataclass
class RunResult:
    config: LoadConfig
    server: dict[str, Any]  # GET /v1/models at the start
    traces: list[SessionTrace]
    t_start: float  # monotonic time of the run's start (arrival offsets count from here)
    wall_s: float


async def run_load(cfg: LoadConfig, on_done: Callable[[SessionTrace], None] | None = None) -> RunResult:
    traces = [SessionTrace(i, at) for i, at in enumerate(cfg.arrivals())]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=30.0, limits=limits) as http:
        server = await _server_info(http, cfg.url)
        slots = asyncio.Semaphore(cfg.max_concurrency or max(1, len(traces)))
        t0 = time.monotonic()

        async def one(trace: SessionTrace) -> None:
            await asyncio.sleep(max(0.0, t0 + trace.scheduled_s - time.monotonic()))
            async with slots:
                try:
                    await run_session(trace, cfg, http)
                except Exception as e:  # a client bug must not lose the run's other sessions
                    trace.fail("client_exception", f"{type(e).__name__}: {e}")
            if on_done is not None:
                on_done(trace)

        await asyncio.gather(*(one(t) for t in traces))
    return RunResult(cfg, server, traces, t0, time.monotonic() - t0)


async def _server_info(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        r = await http.get("/v1/models")
    except httpx.HTTPError as e:
        raise LoadgenError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from e
    if r.status_code == 401:
        raise LoadgenError(f"{url} wants an API key (--api-key or $ROLLCAST_API_KEY)")
    if r.status_code != 200:
        raise LoadgenError(f"{url}/v1/models answered {r.status_code}: is this a rollcast server?")
    return dict(r.json())
