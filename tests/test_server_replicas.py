"""`rollcast serve --replicas 2` on loopback: two pipelines behind one server; concurrent sessions
spread over them by predicted slack, and capacity and metrics report each and the total."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from rollcast.server.background import BackgroundServer
from tests.server_helpers import create, fixed_cost_model, tiny_serve_config, ws_session


def test_two_replicas_share_sessions_and_report_each(tmp_path_factory: pytest.TempPathFactory) -> None:
    cost = fixed_cost_model(tmp_path_factory.mktemp("replicas") / "cost.json")
    with BackgroundServer(tiny_serve_config(cost_model=cost, replicas=2)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        cap = http.get("/v1/capacity").json()
        assert [p["pipeline"] for p in cap["pipelines"]] == [0, 1]
        assert cap["kv_cache_rows"] == 20 and cap["pipeline_failures"] == 0
        sids = [create(http, steps=2).json()["session_id"] for _ in range(2)]
        during = http.get("/v1/capacity").json()
        assert [p["active"] for p in during["pipelines"]] == [1, 1]  # one each: the most slack
        assert [p["kv_cache_rows_used"] for p in during["pipelines"]] == [1, 1]

        async def stream_both() -> list[int]:
            results = await asyncio.gather(*(ws_session(srv.url, sid, 2.0) for sid in sids))
            return [len(r.frames) for r in results]

        assert min(asyncio.run(stream_both())) > 0
        metrics = http.get("/metrics").text
        assert re.search(r'^rollcast_pipeline_failures_total\{pipeline="1"\} 0\.0$', metrics, re.M)
        assert re.search(r'^rollcast_pipeline_rebuilding\{pipeline="0"\} 0\.0$', metrics, re.M)
