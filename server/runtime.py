"""What a serving process runs: the model pipeline, its executor, the engine, sessions and metrics.

`ServeConfig` is the whole configuration of `rollcast serve`; `Runtime.build` turns it into live
parts (loading the model and profiling it to fit the cost model), `start`/`stop` run the engine
threads. With `replicas` > 1 there are that many independent pipelines, each with its executor and
engine, behind a `ReplicaSet` that places sessions by predicted slack. The FastAPI app
(`server.app`) only talks to a `Runtime`.
"""

from __future__ import annotations

import asyncio
import copy
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
from rollcast.scheduler.replica_set import ReplicaSet
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
    replicas: int = 1  # independent pipelines, sessions placed by predicted slack

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")

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
    def __init__(self, config: ServeConfig, executors: list[LocalExecutor], engine: ReplicaSet,
                 metrics: ServerMetrics, manager: SessionManager) -> None:
        self.config = config
        self.executors = executors
        self.engine = engine
        self.metrics = metrics
        self.sessions = manager
        self.started = False
        self.build_seconds = 0.0

    @property
    def pipeline(self) -> VideoPipeline:
        """Replica 0's pipeline (every replica serves the same model and shape)."""
        return self.executors[0].pipeline

    @classmethod
    def build(cls, config: ServeConfig) -> Runtime:
        t0 = time.perf_counter()
        executors: list[LocalExecutor] = []
        try:
            for _ in range(config.replicas):
                pipeline = VideoPipeline.build(config.pipeline, config.parallel.build_runner)
                executors.append(LocalExecutor(pipeline))
        except BaseException:
            for ex in executors:
                ex.pipeline.shutdown()
            raise
        pipeline = executors[0].pipeline
        if config.cost_model is not None:
            cost = CostModel.load(config.cost_model)
        else:  # replicas are alike: profile one
            sizes = tuple(b for b in (1, 2, 4) if b <= pipeline.runner.pool.free_rows)
            cost = executors[0].profile(_base_cost(config.pipeline.worker), batch_sizes=sizes, repeats=2)
            if config.save_cost_model is not None:
                cost.save(config.save_cost_model)
        # Engines, metrics and sessions refer to each other; the closures read the names below,
        # which are all bound before an engine thread starts or anything is scraped.
        engines = [Engine(ex, copy.deepcopy(cost), make_policy(config.policy), clock=MonotonicClock(),
                          geometry=ex.geometry,
                          config=EngineConfig(max_batch=config.max_batch, admission=config.admission),
                          on_event=lambda e: manager.on_engine_event(e))
                   for ex in executors]
        replicas = ReplicaSet(engines)
        metrics = ServerMetrics(lambda: rt.state())
        manager = SessionManager(replicas, metrics=metrics, defaults=config.sessions, model_fps=pipeline.fps,
                                 default_steps=len(pipeline.runner.sampler.timesteps(None)),
                                 resolution=pipeline.resolution)
        rt = cls(config, executors, replicas, metrics, manager)
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
        for ex in self.executors:
            ex.pipeline.shutdown()
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started and self.engine.running

    def state(self) -> dict[str, object]:
        """Scrape-time view for metrics and /v1/capacity: totals, and `pipelines`, one per replica."""
        snap = self.engine.snapshot()
        pipelines = []
        for i, (ex, rsnap) in enumerate(zip(self.executors, snap["replicas"], strict=True)):  # type: ignore[call-overload]
            runner = ex.pipeline.runner
            pipelines.append({
                "pipeline": i, "active": rsnap["active"], "queued": rsnap["queued"],
                "predicted_load": rsnap["predicted_load"], "rebuilding": rsnap["rebuilding"],
                "failures": rsnap["pipeline_failures"], "kv_cache_bytes": runner.dit.kv_bytes,
                "kv_cache_rows_used": runner.pool.rows - runner.pool.free_rows,
                "kv_cache_rows": runner.pool.rows})
        counts = self.sessions.counts()
        gpu = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return {"sessions": counts, "predicted_load": snap["predicted_load"],
                "mean_batch": snap["mean_batch"],
                "kv_cache_bytes": sum(p["kv_cache_bytes"] for p in pipelines),
                "kv_cache_rows_used": sum(p["kv_cache_rows_used"] for p in pipelines),
                "kv_cache_rows": sum(p["kv_cache_rows"] for p in pipelines), "gpu_memory_bytes": gpu,
                "pipeline_failures": sum(p["failures"] for p in pipelines), "pipelines": pipelines}

