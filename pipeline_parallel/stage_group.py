"""Starting a pipeline's stages: as threads of this process (`local`), as one process per stage
(`mp`, torch.multiprocessing + torch.distributed: gloo on CPU, NCCL between GPUs), or as Ray
actors (`ray`, `ray_stages.py`).

Every way the driver is rank 0 in this process and gets a `PipelineDiT`; stage i is rank i + 1,
and the optional decode stage comes last (rank stages + 1).
Start-up ends with a ping around the ring, so a stage that cannot build its model fails the start
with its error instead of the first forward. A stage process that dies later is noticed by the
transport's liveness check and fails the pipeline with its exit code.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.multiprocessing as tmp

from rollcast.pipeline_parallel.decode_stage import DecodeStage
from rollcast.pipeline_parallel.pipeline_dit import PipelineDiT
from rollcast.pipeline_parallel.stage_worker import StageSpec, StageWorker
from rollcast.pipeline_parallel.transport import (
    DistTransport,
    Liveness,
    QueueHub,
    Transport,
    connect_ring,
    free_port,
)
from rollcast.workers.stream_generator import WorkerSpec, build_pool
from rollcast.workers.vae import VaeSpec

if TYPE_CHECKING:
    from rollcast.pipeline_parallel.ray_stages import RayConfig

StageExecutor = Literal["local", "mp", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "mp", "ray")


@dataclass(frozen=True)
class RingPlan:
    """What each rank after the driver runs: DiT stages over `ranges`, then maybe a decode stage."""

    spec: WorkerSpec
    ranges: tuple[range, ...]
    vae: VaeSpec | None = None  # decode finished blocks in the pipeline (None: the driver does)
    decode_stage: bool = False

    def __post_init__(self) -> None:
        if self.decode_stage and self.vae is None:
            raise ValueError("a decode stage needs the VAE to build")

    @property
    def ranks(self) -> int:
        """Ranks after the driver."""
        return len(self.ranges) + self.decode_stage

    def rank_name(self, rank: int) -> str:
        return f"stage {rank - 1}" if rank <= len(self.ranges) else "the decode stage"

    def stage(self, i: int) -> StageSpec:
        return StageSpec(self.spec, self.ranges, i, vae=self.vae, vae_stage=self.decode_stage)

    def driver(self, transport: Transport, *, on_close: Callable[[], None],
               auto_rebalance: bool) -> PipelineDiT:
        return PipelineDiT(transport, self.spec.config, build_pool(self.spec, range(0)), list(self.ranges),
                           decodes=self.vae is not None, decode_stage=self.decode_stage,
                           on_close=on_close, auto_rebalance=auto_rebalance)


def start_pipeline(spec: WorkerSpec, ranges: list[range], executor: StageExecutor = "local", *,
                   vae: VaeSpec | None = None, decode_stage: bool = False, ray: RayConfig | None = None,
                   auto_rebalance: bool = True, start_timeout_s: float = 600.0) -> PipelineDiT:
    """Start the stages and return the driver. With `vae`, finished blocks are decoded on the last
    stage, or on a decode stage of their own with `decode_stage`."""
    plan = RingPlan(spec, tuple(ranges), vae, decode_stage)
    if executor == "local":
        return _start_threads(plan, auto_rebalance)
    if executor == "mp":
        return _start_processes(plan, auto_rebalance, start_timeout_s)
    if executor == "ray":
        from rollcast.pipeline_parallel.ray_stages import RayConfig, start_ray_pipeline  # Ray loads slowly

        return start_ray_pipeline(plan, ray or RayConfig(), auto_rebalance=auto_rebalance,
                                  start_timeout_s=start_timeout_s)
    raise ValueError(f"unknown stage executor {executor!r}; choose one of {list(EXECUTORS)}")


# -- threads ------------------------------------------------------------------------------------


def _start_threads(plan: RingPlan, auto_rebalance: bool) -> PipelineDiT:
    hub = QueueHub(plan.ranks + 1)
    workers: list[StageWorker | DecodeStage] = [StageWorker(plan.stage(i)) for i in range(len(plan.ranges))]
    if plan.decode_stage:
        workers.append(DecodeStage(plan.vae, plan.ranks))  # type: ignore[arg-type]
    threads = []
    for i, worker in enumerate(workers):
        th = threading.Thread(target=_serve_thread, args=(worker, hub, i + 1, plan.rank_name(i + 1)),
                              name=f"rollcast-stage{i}", daemon=True)
        th.start()
        threads.append(th)

    def join() -> None:
        for th in threads:
            th.join(timeout=10)

    dit = plan.driver(hub.transport(0), on_close=join, auto_rebalance=auto_rebalance)
    dit.ping()
    return dit


def _serve_thread(worker: StageWorker | DecodeStage, hub: QueueHub, rank: int, name: str) -> None:
    try:
        worker.serve(hub.transport(rank))
    except BaseException as e:  # the driver must hear of it, not wait forever
        hub.fail(rank, f"{name} thread died: {type(e).__name__}: {e}")


# -- processes ----------------------------------------------------------------------------------


def serve_rank(plan: RingPlan, rank: int, world: int, init_method: str, threads: int) -> int:
    """One rank after the driver, in its own process: join the ring, build the stage (rank r on
    GPU r - 1 mod the visible GPUs), serve until `stop`. Returns the exit code."""
    torch.set_num_threads(threads)
    device = plan.spec.device
    if device.startswith("cuda"):
        index = (rank - 1) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    group = connect_ring(rank, world, init_method=init_method, cuda=device.startswith("cuda"))
    transport = DistTransport(group, device=torch.device(device))
    try:
        if rank <= len(plan.ranges):
            spec = plan.stage(rank - 1)
            StageWorker(dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, device=device))
                        ).serve(transport)
        else:
            DecodeStage(plan.vae, rank, device).serve(transport)  # type: ignore[arg-type]
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        transport.close()
    return 0


def _rank_main(plan: RingPlan, rank: int, world: int, init_method: str, threads: int) -> None:
    code = serve_rank(plan, rank, world, init_method, threads)
    # Everything is sent: skip the interpreter's teardown, where gloo threads owned by C++ statics
    # abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def connect_driver(plan: RingPlan, init_method: str, *, liveness: Liveness, on_close: Callable[[], None],
                   auto_rebalance: bool, start_timeout_s: float) -> PipelineDiT:
    """Join the ring as rank 0 once the other ranks are launched, and ping around it (a rank that
    cannot build its stage fails the start with its error). `on_close` stops the ranks."""
    device = torch.device(plan.spec.device)
    try:
        group = connect_ring(0, plan.ranks + 1, init_method=init_method, cuda=device.type == "cuda",
                             timeout_s=start_timeout_s)
    except BaseException:
        on_close()
        raise
    transport = DistTransport(group, device=device, liveness=liveness)

    def close() -> None:
        on_close()
        transport.close()

    dit = plan.driver(transport, on_close=close, auto_rebalance=auto_rebalance)
    try:
        dit.ping()
    except BaseException:
        dit.close()
        raise
    return dit


def _start_processes(plan: RingPlan, auto_rebalance: bool, start_timeout_s: float) -> PipelineDiT:
    ranks = plan.ranks
    ctx = tmp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    threads = max(1, (os.cpu_count() or 1) // ranks)
    procs = [ctx.Process(target=_rank_main, name=f"rollcast-rank{r}", daemon=True,
                         args=(plan, r, ranks + 1, init_method, threads))
             for r in range(1, ranks + 1)]
    for p in procs:
        p.start()

    def liveness(rank: int) -> str | None:
        p = procs[rank - 1] if 1 <= rank <= ranks else None
        if p is not None and p.exitcode is not None:
            return f"{plan.rank_name(rank)} (process {p.pid}) exited with code {p.exitcode}"
        return None

    def stop() -> None:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    dit = connect_driver(plan, init_method, liveness=liveness, on_close=stop, auto_rebalance=auto_rebalance,
                         start_timeout_s=start_timeout_s)
    dit.stage_pids = [p.pid for p in procs]
    return dit
