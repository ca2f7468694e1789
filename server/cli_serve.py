"""`rollcast serve`: the model, the engine and the HTTP/WebRTC server in one process.

Flags are checked before the model loads (a bad one exits 2 with one line); then the model is
built and profiled, and uvicorn serves the app until interrupted. Shutdown ends every session with
a `stream_stopped` message.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from pathlib import Path

from rollcast.scheduler.admission import AdmissionConfig
from rollcast.scheduler.policies import POLICY_NAMES
from rollcast.server.cli_args import (
    add_model_args,
    add_parallel_args,
    add_weights_arg,
    parallel_config,
    positive_float,
    positive_int,
    random_weights,
    worker_spec,
)
from rollcast.server.runtime import ServeConfig
from rollcast.server.sessions import SessionDefaults
from rollcast.workers.vae import VAE_KINDS
from rollcast.workers.video_pipeline import PipelineSpec


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, checkpoint_help="model directory with the published file names (default: the "
                   "shipped tiny model, random weights for other presets)")
    add_weights_arg(p)
    p.add_argument("--vae", choices=VAE_KINDS, default=None, help="default: the model config's")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000)
    add_parallel_args(p)
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="independent pipelines (each --stages stages, its own KV caches and engine); "
                        "new sessions go to the one with the most predicted slack")
    p.add_argument("--scheduler", default="slo", choices=POLICY_NAMES,
                   help="batching policy (default slo)")
    p.add_argument("--max-sessions", type=positive_int, default=8, help="KV cache rows (concurrent streams)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="forwards per micro-batch at most")
    p.add_argument("--ttff-ms", type=positive_float, default=2000.0, help="default time-to-first-frame SLO")
    p.add_argument("--fps", type=positive_float, default=None, help="default output fps (the model's)")
    p.add_argument("--steps", type=positive_int, default=None, help="default denoising steps (all)")
    p.add_argument("--max-duration", type=positive_float, default=600.0, help="longest session, seconds")
    p.add_argument("--max-sessions-per-client", type=positive_int, default=4)
    p.add_argument("--max-utilization", type=positive_float, default=0.9,
                   help="admission keeps the predicted load under this (0-1]")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ROLLCAST_API_KEY, else none)")
    p.add_argument("--cost-model", type=Path, default=None,
                   help="cost model JSON to use instead of profiling at start-up")
    p.add_argument("--save-cost-model", type=Path, default=None, help="write the profiled cost model here")
    p.add_argument("--ice-server", action="append", default=[],
                   help="STUN/TURN server for WebRTC: stun:HOST:PORT, turn:HOST:PORT or "
                        "turn:USER:CREDENTIAL@HOST:PORT; repeatable")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def serve_config(args: argparse.Namespace) -> ServeConfig:
    if args.max_utilization > 1:
        raise ValueError(f"--max-utilization must lie in (0, 1], got {args.max_utilization}")
    from rollcast.server.webrtc import ice_server  # aiortc loads slowly: only for serve

    for url in args.ice_server:
        ice_server(url)  # a malformed one fails here, before anything loads
    if args.cost_model is not None and not args.cost_model.is_file():
        raise ValueError(f"--cost-model {args.cost_model}: no such file")
    synthetic = random_weights(args)  # before worker_spec reads the checkpoint
    worker = worker_spec(args)
    worker = dataclasses.replace(worker, max_sessions=args.max_sessions)
    parallel = parallel_config(args)
    parallel.ranges(worker.config.num_layers)  # a bad split fails before anything loads
    return ServeConfig(
        pipeline=PipelineSpec(worker=worker, vae=args.vae, synthetic_weights=synthetic),
        host=args.host, port=args.port,
        api_key=ServeConfig.api_key_from_env(args.api_key), policy=args.scheduler, max_batch=args.max_batch,
        admission=AdmissionConfig(max_utilization=args.max_utilization),
        sessions=SessionDefaults(ttff_s=args.ttff_ms / 1e3, fps=args.fps, steps=args.steps,
                                 max_duration_s=args.max_duration,
                                 max_sessions_per_client=args.max_sessions_per_client),
        cost_model=args.cost_model, save_cost_model=args.save_cost_model, ice_servers=tuple(args.ice_server),
        parallel=parallel, replicas=args.replicas)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from rollcast.server.app import create_app
    from rollcast.server.http_server import GracefulServer
    from rollcast.server.runtime import Runtime

    config = serve_config(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runtime = Runtime.build(config)
    app = create_app(runtime)
    w, h = runtime.pipeline.resolution
    logging.getLogger("rollcast.serve").info(
        "serving %s at %dx%d on http://%s:%d (auth %s)", config.pipeline.worker.config.name, w, h,
        config.host, config.port, "on" if config.api_key else "off")
    server = GracefulServer(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5), runtime)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after shutting down
        server.run()
    return 0
