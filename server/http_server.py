"""uvicorn, with rollcast's shutdown order: streams end before connections close.

uvicorn closes open WebSockets (code 1012) before the app's lifespan shutdown runs, which would cut
streams off without their `stream_stopped` message. This server ends every session first, gives
the transports a moment to flush that message, then lets uvicorn close what is left.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from rollcast.server.runtime import Runtime

FLUSH_S = 0.3  # time for the last control messages to leave after the sessions end


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.runtime.sessions.loop is not None:
            await self.runtime.sessions.shutdown()
            await asyncio.sleep(FLUSH_S)
        await super().shutdown(sockets)
