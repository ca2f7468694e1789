"""Starting a pipeline's stages: as threads of this process (`local`) or as one process per stage
(`mp`, torch.multiprocessing + torch.distributed: gloo on CPU, NCCL between GPUs).

Either way the driver is rank 0 in this process and gets a `PipelineDiT`; stage i is rank i + 1,
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
from typing import Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from rollcast.pipeline_parallel.decode_stage import DecodeStage
from rollcast.pipeline_parallel.pipeline_dit import PipelineDiT
from rollcast.pipeline_parallel.stage_worker import StageSpec, StageWorker
from rollcast.pipeline_parallel.transport import (
    DistTransport,
    QueueHub,
    Transport,
    free_port,
    init_process_group,
)
from rollcast.workers.stream_generator import WorkerSpec, build_pool
from rollcast.workers.vae import VaeSpec

StageExecutor = Literal["local", "mp"]
EXECUTORS: tuple[str, ...] = ("local", "mp")


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

    def stage(self, i: int) -> StageSpec:
        return StageSpec(self.spec, self.ranges, i, vae=self.vae, vae_stage=self.decode_stage)

    def driver(self, transport: Transport, **kw: object) -> PipelineDiT:
        return PipelineDiT(transport, self.spec.config, build_pool(self.spec, range(0)), list(self.ranges),
                           decodes=self.vae is not None, decode_stage=self.decode_stage, **kw)  # type: ignore[arg-type]


def start_pipeline(spec: WorkerSpec, ranges: list[range], executor: StageExecutor = "local", *,
                   vae: VaeSpec | None = None, decode_stage: bool = False,
                   auto_rebalance: bool = True, start_timeout_s: float = 600.0) -> PipelineDiT:
    """Start the stages and return the driver. With `vae`, finished blocks are decoded on the last
    stage, or on a decode stage of their own with `decode_stage`."""
    plan = RingPlan(spec, tuple(ranges), vae, decode_stage)
    if executor == "local":
        return _start_threads(plan, auto_rebalance)
    if executor == "mp":
        return _start_processes(plan, auto_rebalance, start_timeout_s)
    raise ValueError(f"unknown stage executor {executor!r}; choose one of {list(EXECUTORS)}")


# -- threads ------------------------------------------------------------------------------------


def _start_threads(plan: RingPlan, auto_rebalance: bool) -> PipelineDiT:
    hub = QueueHub(plan.ranks + 1)
    workers: list[StageWorker | DecodeStage] = [StageWorker(plan.stage(i)) for i in range(len(plan.ranges))]
    if plan.decode_stage:
        workers.append(DecodeStage(plan.vae, plan.ranks))  # type: ignore[arg-type]
    threads = []
    for i, worker in enumerate(workers):
        th = threading.Thread(target=_serve_thread, args=(worker, hub, i + 1),
                              name=f"rollcast-stage{i}", daemon=True)
        th.start()
        threads.append(th)

    def join() -> None:
        for th in threads:
            th.join(timeout=10)

    dit = plan.driver(hub.transport(0), on_close=join, auto_rebalance=auto_rebalance)
    dit.ping()
    return dit


def _serve_thread(worker: StageWorker | DecodeStage, hub: QueueHub, rank: int) -> None:
    try:
        worker.serve(hub.transport(rank))
    except BaseException as e:  # the driver must hear of it, not wait forever
        hub.fail(rank, f"{_rank_name(worker, rank)} thread died: {type(e).__name__}: {e}")


def _rank_name(worker: object, rank: int) -> str:
    return "the decode stage" if isinstance(worker, DecodeStage) else f"stage {rank - 1}"


# -- processes ----------------------------------------------------------------------------------


def _rank_main(plan: RingPlan, rank: int, world: int, init_method: str, threads: int) -> None:
    """A stage process: join the group, build the stage (rank r on GPU r - 1 mod the GPU count),
    serve until `stop`."""
    torch.set_num_threads(threads)
    device, backend = plan.spec.device, "gloo"
    if device.startswith("cuda"):
        backend = "nccl"
        index = (rank - 1) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    init_process_group(rank, world, backend=backend, init_method=init_method, timeout_s=600.0)
    transport = DistTransport(rank, world, device=torch.device(device))
    code = 0
    try:
        if rank <= len(plan.ranges):
            spec = plan.stage(rank - 1)
            StageWorker(dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, device=device))
                        ).serve(transport)
        else:
            DecodeStage(plan.vae, rank, device).serve(transport)  # type: ignore[arg-type]
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        transport.close()
        dist.destroy_process_group()
    # Everything is sent and the group is gone: skip the interpreter's teardown, where gloo threads
    # owned by C++ statics abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start_processes(plan: RingPlan, auto_rebalance: bool, start_timeout_s: float) -> PipelineDiT:
    ranks = plan.ranks
    world = ranks + 1
    ctx = tmp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    threads = max(1, (os.cpu_count() or 1) // ranks)
    procs = [ctx.Process(target=_rank_main, name=f"rollcast-rank{r}", daemon=True,
                         args=(plan, r, world, init_method, threads))
             for r in range(1, ranks + 1)]
    for p in procs:
        p.start()

    def liveness(rank: int) -> str | None:
        p = procs[rank - 1] if 1 <= rank <= ranks else None
        if p is not None and p.exitcode is not None:
            who = f"stage {rank - 1}" if rank <= len(plan.ranges) else "the decode stage"
            return f"{who} (process {p.pid}) exited with code {p.exitcode}"
        return None

    device = torch.device(plan.spec.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        init_process_group(0, world, backend=backend, init_method=init_method, timeout_s=start_timeout_s)
        transport = DistTransport(0, world, device=device, liveness=liveness)
    except BaseException:
        _stop_processes(procs)
        raise
    dit = plan.driver(transport, on_close=_closer(procs, transport), auto_rebalance=auto_rebalance)
    dit.stage_pids = [p.pid for p in procs]
    try:
        dit.ping()
    except BaseException:
        dit.close()
        raise
    return dit


def _closer(procs: list, transport: DistTransport) -> Callable[[], None]:
    def close() -> None:
        for p in procs:
            p.join(timeout=10)
        _stop_processes(procs)
        transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return close


def _stop_processes(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
