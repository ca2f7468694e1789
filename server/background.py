"""Run the server on a background thread of this process: for tests, benchmarks and embedding.

The socket is bound before uvicorn starts (port 0 picks a free one), so `url` is known at once
and there is no race between choosing a port and listening on it.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from rollcast.server.app import create_app
from rollcast.server.http_server import GracefulServer
from rollcast.server.runtime import Runtime, ServeConfig


class BackgroundServer:
    def __init__(self, config: ServeConfig, *, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime.build(config)
        self.app = create_app(self.runtime)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((config.host, config.port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        self._server = GracefulServer(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=5), self.runtime)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="rollcast-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
