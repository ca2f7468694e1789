"""Pipeline stages as Ray actors (`--executor ray`).

One actor per rank after the driver (DiT stages, then the optional decode stage), all in one
placement group per pipeline with the PACK strategy (one node when it fits, spread when it must),
each asking for one GPU when the model runs on CUDA. The actors join the pipeline's own ring group
(`connect_ring`: gloo on CPU, NCCL for CUDA tensors) with the driver as rank 0 at this node's IP;
from then on they serve exactly as `mp` stage processes do. Ray is only the process manager:
placement, restarts and cluster membership are its; activations never go through its object store.

An actor that dies (its process killed, its node lost) is noticed by the transport's liveness
check, which looks at the actor's `serve` call: finished means the rank is gone.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollcast.pipeline_parallel.pipeline_dit import PipelineDiT
from rollcast.pipeline_parallel.stage_group import RingPlan, connect_driver, serve_rank
from rollcast.pipeline_parallel.transport import free_port


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # "auto" or ray://...: join that cluster; None: start a local one
    namespace: str = "rollcast"
    # How long a pipeline's placement group may wait for room: a named cluster may be scaling up
    # (default 300 s); without one only released resources can make room (default 30 s).
    placement_timeout_s: float | None = None
    # Per rank after the driver, a custom Ray resource its bundle asks one unit of (e.g.
    # "gpu_h100", as the nodes of a GPU group advertise it): heterogeneous groups, with the
    # layer split planned for their speeds (`rollcast partition`, --layer-ranges). Empty: any node.
    stage_resources: tuple[str, ...] = ()

    @property
    def wait_s(self) -> float:
        if self.placement_timeout_s is not None:
            return self.placement_timeout_s
        return 300.0 if self.address is not None else 30.0

    def bundles(self, ranks: int, gpus: int) -> list[dict[str, float]]:
        if self.stage_resources and len(self.stage_resources) != ranks:
            raise ValueError(f"{len(self.stage_resources)} stage resources for {ranks} pipeline ranks")
        out = []
        for i in range(ranks):
            # A GPU stage computes on its GPU: it takes no CPU slot (as vLLM's Ray workers do);
            # a CPU stage computes on a core.
            bundle = {"GPU": float(gpus)} if gpus else {"CPU": 1.0}
            if self.stage_resources and self.stage_resources[i]:
                bundle[self.stage_resources[i]] = 1.0
            out.append(bundle)
        return out


def ensure_ray(config: RayConfig) -> None:
    """Connect this process to Ray once (a local cluster when no address is given)."""
    if ray.is_initialized():
        return
    # CPU-only actors keep the GPUs visible (Ray's current default, stated to silence its warning).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(address=config.address, namespace=config.namespace, ignore_reinit_error=True,
             log_to_driver=False, include_dashboard=False)


@ray.remote(max_restarts=0)
class StageActor:
    """A rank of one pipeline; `serve` blocks (in the actor) until the ring's `stop`."""

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def serve(self, plan: RingPlan, rank: int, world: int, init_method: str, threads: int) -> int:
        return serve_rank(plan, rank, world, init_method, threads)


def start_ray_pipeline(plan: RingPlan, config: RayConfig, *, auto_rebalance: bool,
                       start_timeout_s: float) -> PipelineDiT:
    ensure_ray(config)
    gpus = 1 if plan.spec.device.startswith("cuda") else 0
    bundles = config.bundles(plan.ranks, gpus)
    _check_room(bundles)
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=config.wait_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ValueError(f"no room in the Ray cluster for a pipeline of {plan.ranks} ranks {bundles} "
                         f"within {config.wait_s:g} s (cluster: {ray.cluster_resources()})") from None
    except BaseException:
        remove_placement_group(pg)
        raise
    actors = [StageActor.options(num_cpus=0 if gpus else 1, num_gpus=gpus,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(
                                     pg, placement_group_bundle_index=i)).remote()
              for i in range(plan.ranks)]

    def kill() -> None:
        for actor in actors:
            ray.kill(actor)
        _remove(pg)

    try:
        # Asked before `serve` occupies them (an actor runs one call at a time).
        pids = ray.get([a.pid.remote() for a in actors])
        nodes = ray.get([a.node_id.remote() for a in actors])
        init_method = f"tcp://{ray.util.get_node_ip_address()}:{free_port('0.0.0.0')}"
        calls = [a.serve.remote(plan, r, plan.ranks + 1, init_method, 1) for r, a in enumerate(actors, 1)]
    except BaseException:
        kill()
        raise

    def liveness(rank: int) -> str | None:
        if not 1 <= rank <= len(calls):
            return None
        done, _ = ray.wait([calls[rank - 1]], timeout=0)
        if not done:
            return None
        try:
            code = ray.get(done[0])
        except ray.exceptions.RayError as e:
            return f"{plan.rank_name(rank)} (Ray actor) died: {type(e).__name__}"
        return f"{plan.rank_name(rank)} (Ray actor) stopped serving with code {code}"

    def stop() -> None:
        ray.wait(calls, num_returns=len(calls), timeout=10)  # they end on the ring's stop
        kill()

    dit = connect_driver(plan, init_method, liveness=liveness, on_close=stop, auto_rebalance=auto_rebalance,
                         start_timeout_s=start_timeout_s)
    dit.stage_actors = list(actors)
    dit.stage_pids = pids
    dit.stage_nodes = nodes
    return dit


def _check_room(bundles: list[dict[str, float]]) -> None:
    """Fail at once when the cluster as it is could never hold the pipeline (free or not)."""
    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if short:
        raise ValueError(f"no room in the Ray cluster for a pipeline: it needs {need}, the cluster has "
                           f"{ {k: total.get(k, 0.0) for k in need} } in all (fewer --stages, other "
                           f"--ray-resources, or a bigger cluster)")


def _remove(pg: PlacementGroup) -> None:
    with contextlib.suppress(ray.exceptions.RayError):  # the cluster may be going away with it
        remove_placement_group(pg)
