"""What a serving process runs: the model pipeline, its executor, the engine, sessions and metrics.

`ServeConfig` is the whole configuration of `rollcast serve`; `Runtime.build` turns it into live
parts (loading the model and profiling it to fit the cost model), `start`/`stop` run the engine
thread. The FastAPI app (`server.app`) only talks to a `Runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rollcast.pipeline_parallel.parallel_config import ParallelConfig
from rollcast.scheduler.admission import AdmissionConfig
from rollcast.scheduler.clock import MonotonicClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.local_executor import LocalExecutor
from rollcast.scheduler.policies import make_policy
from rollcast.server.metrics import ServerMetrics
from rollcast.server.sessions import SessionDefaults, SessionManager
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline

log = logging.getLogger("rollcast.serve")

API_KEY_ENV = "ROLLCAST_API_KEY"  # the one environment variable the server reads


@dataclass(frozen=True)
class ServeConfig:
    pipeline: PipelineSpec
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    policy: str = "slo"
    max_batch: int = 8
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    sessions: SessionDefaults = field(default_factory=SessionDefaults)
    cost_model: Path | None = None  # a fitted cost model JSON; None: profile at start-up
    save_cost_model: Path | None = None
    max_body_bytes: int = 64 * 1024
    ice_servers: tuple[str, ...] = ()
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # pipeline stages of the DiT

    @staticmethod
    def api_key_from_env(flag: str | None) -> str | None:
        """The bearer token: the flag wins, else $ROLLCAST_API_KEY, else none (no auth)."""
        return flag or os.environ.get(API_KEY_ENV) or None


def _base_cost(worker: WorkerSpec) -> CostModel:
    """A starting point the profile refines: a rough machine guess, so the fit has a scale."""
    peak = 2e14 if worker.device.startswith("cuda") else 5e10
    return CostModel.for_model(worker.config, name=f"{worker.config.name}-{worker.device}", peak_flops=peak,
                               half_tokens=200.0, overhead_s=0.002 if peak > 1e12 else 0.01,
                               decode_s_per_latent_frame=0.005)


class Runtime:
    def __init__(self, config: ServeConfig, pipeline: VideoPipeline, executor: LocalExecutor,
                 engine: Engine, metrics: ServerMetrics, manager: SessionManager) -> None:
        self.config = config
        self.pipeline = pipeline
        self.executor = executor
        self.engine = engine
        self.metrics = metrics
        self.sessions = manager
        self.started = False
        self.build_seconds = 0.0

    @classmethod
    def build(cls, config: ServeConfig) -> Runtime:
        t0 = time.perf_counter()
        pipeline = VideoPipeline.build(config.pipeline, config.parallel.build_runner)
        executor = LocalExecutor(pipeline)
        if config.cost_model is not None:
            cost = CostModel.load(config.cost_model)
        else:
            sizes = tuple(b for b in (1, 2, 4) if b <= pipeline.runner.pool.free_rows)
            cost = executor.profile(_base_cost(config.pipeline.worker), batch_sizes=sizes, repeats=2)
            if config.save_cost_model is not None:
                cost.save(config.save_cost_model)
        # Engine, metrics and sessions refer to each other; the closures read the names below,
        # which are all bound before the engine thread starts or anything is scraped.
        engine = Engine(executor, cost, make_policy(config.policy), clock=MonotonicClock(),
                        geometry=executor.geometry,
                        config=EngineConfig(max_batch=config.max_batch, admission=config.admission),
                        on_event=lambda e: manager.on_engine_event(e))
        metrics = ServerMetrics(lambda: rt.state())
        manager = SessionManager(engine, metrics=metrics, defaults=config.sessions, model_fps=pipeline.fps,
                                 default_steps=len(pipeline.runner.sampler.timesteps(None)),
                                 resolution=pipeline.resolution)
        rt = cls(config, pipeline, executor, engine, metrics, manager)
        rt.build_seconds = time.perf_counter() - t0
        worker = config.pipeline.worker
        log.info("built %s on %s in %.1f s", worker.config.name, worker.device, rt.build_seconds)
        return rt

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sessions.attach_loop(loop)
        self.engine.start()
        self.started = True

    def stop(self) -> None:
        self.engine.stop()
        self.pipeline.shutdown()
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started and self.engine.running

    def state(self) -> dict[str, object]:
        """Scrape-time view for metrics and /v1/capacity."""
        snap = self.engine.snapshot()
        pool = self.pipeline.runner.pool
        counts = self.sessions.counts()
        gpu = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return {"sessions": counts, "predicted_load": snap["predicted_load"],
                "mean_batch": snap["mean_batch"],
                "kv_cache_bytes": self.pipeline.runner.dit.kv_bytes,
                "kv_cache_rows_used": pool.rows - pool.free_rows,
                "kv_cache_rows": pool.rows, "gpu_memory_bytes": gpu}

