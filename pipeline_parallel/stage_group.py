"""Starting a pipeline's stages: as threads of this process (`local`) or as one process per stage
(`mp`, torch.multiprocessing + torch.distributed: gloo on CPU, NCCL between GPUs).

Either way the driver is rank 0 in this process and gets a `PipelineDiT`; stage i is rank i + 1.
Start-up ends with a ping around the ring, so a stage that cannot build its model fails the start
with its error instead of the first forward. A stage process that dies later is noticed by the
transport's liveness check and fails the pipeline with its exit code.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import traceback
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from rollcast.pipeline_parallel.pipeline_dit import PipelineDiT
from rollcast.pipeline_parallel.stage_worker import StageSpec, StageWorker
from rollcast.pipeline_parallel.transport import (
    DistTransport,
    QueueHub,
    free_port,
    init_process_group,
)
from rollcast.workers.stream_generator import WorkerSpec, build_pool

StageExecutor = Literal["local", "mp"]
EXECUTORS: tuple[str, ...] = ("local", "mp")


def start_pipeline(spec: WorkerSpec, ranges: list[range], executor: StageExecutor = "local", *,
                   auto_rebalance: bool = True, start_timeout_s: float = 600.0) -> PipelineDiT:
    if executor == "local":
        return _start_threads(spec, ranges, auto_rebalance)
    if executor == "mp":
        return _start_processes(spec, ranges, auto_rebalance, start_timeout_s)
    raise ValueError(f"unknown stage executor {executor!r}; choose one of {list(EXECUTORS)}")


# -- threads ------------------------------------------------------------------------------------


def _start_threads(spec: WorkerSpec, ranges: list[range], auto_rebalance: bool) -> PipelineDiT:
    hub = QueueHub(len(ranges) + 1)
    workers = [StageWorker(StageSpec(spec, tuple(ranges), i)) for i in range(len(ranges))]
    threads = []
    for i, worker in enumerate(workers):
        th = threading.Thread(target=_serve_thread, args=(worker, hub, i + 1),
                              name=f"rollcast-stage{i}", daemon=True)
        th.start()
        threads.append(th)

    def join() -> None:
        for th in threads:
            th.join(timeout=10)

    dit = PipelineDiT(hub.transport(0), spec.config, build_pool(spec, range(0)), ranges, on_close=join,
                      auto_rebalance=auto_rebalance)
    dit.ping()
    return dit


def _serve_thread(worker: StageWorker, hub: QueueHub, rank: int) -> None:
    try:
        worker.serve(hub.transport(rank))
    except BaseException as e:  # the driver must hear of it, not wait forever
        hub.fail(rank, f"stage {rank - 1} thread died: {type(e).__name__}: {e}")


# -- processes ----------------------------------------------------------------------------------


def _stage_main(spec: StageSpec, rank: int, world: int, init_method: str, threads: int) -> None:
    """A stage process: join the group, build the stage, serve until `stop`."""
    torch.set_num_threads(threads)
    worker_spec = spec.worker
    backend = "gloo"
    if worker_spec.device.startswith("cuda"):
        backend = "nccl"
        index = spec.index % torch.cuda.device_count()
        torch.cuda.set_device(index)
        spec = dataclasses.replace(spec, worker=dataclasses.replace(worker_spec, device=f"cuda:{index}"))
    init_process_group(rank, world, backend=backend, init_method=init_method, timeout_s=600.0)
    transport = DistTransport(rank, world, device=torch.device(spec.worker.device))
    try:
        StageWorker(spec).serve(transport)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        transport.close()
        dist.destroy_process_group()


def _start_processes(spec: WorkerSpec, ranges: list[range], auto_rebalance: bool,
                     start_timeout_s: float) -> PipelineDiT:
    stages = len(ranges)
    world = stages + 1
    ctx = tmp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    threads = max(1, (os.cpu_count() or 1) // stages)
    procs = [ctx.Process(target=_stage_main, name=f"rollcast-stage{i}", daemon=True,
                         args=(StageSpec(spec, tuple(ranges), i), i + 1, world, init_method, threads))
             for i in range(stages)]
    for p in procs:
        p.start()

    def liveness(rank: int) -> str | None:
        p = procs[rank - 1] if 1 <= rank <= stages else None
        if p is not None and p.exitcode is not None:
            return f"stage {rank - 1} (process {p.pid}) exited with code {p.exitcode}"
        return None

    device = torch.device(spec.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        init_process_group(0, world, backend=backend, init_method=init_method, timeout_s=start_timeout_s)
        transport = DistTransport(0, world, device=device, liveness=liveness)
    except BaseException:
        _stop_processes(procs)
        raise
    dit = PipelineDiT(transport, spec.config, build_pool(spec, range(0)), ranges,
                      on_close=_closer(procs, transport), auto_rebalance=auto_rebalance)
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
