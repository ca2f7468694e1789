"""Pipelines on Ray: stages as actors in a placement group on a (simulated) two-node cluster give
the same frames as one process; a killed actor fails its pipeline fast and by name."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from rollcast.pipeline_parallel.parallel_config import ParallelConfig  # noqa: E402
from rollcast.pipeline_parallel.pipeline_dit import PipelineFailedError  # noqa: E402
from rollcast.pipeline_parallel.ray_stages import RayConfig  # noqa: E402
from rollcast.pipeline_parallel.stage_group import start_pipeline  # noqa: E402
from rollcast.scheduler.clock import MonotonicClock  # noqa: E402
from rollcast.scheduler.cost_model import CostModel  # noqa: E402
from rollcast.scheduler.engine import Engine, EngineConfig  # noqa: E402
from rollcast.scheduler.events import EngineEvent  # noqa: E402
from rollcast.scheduler.local_executor import LocalExecutor  # noqa: E402
from rollcast.scheduler.policies import make_policy  # noqa: E402
from rollcast.scheduler.replica_set import ReplicaSet  # noqa: E402
from rollcast.scheduler.session import SessionRequest, SessionSLO  # noqa: E402
from rollcast.workers.cache_policy import CachePolicy  # noqa: E402
from rollcast.workers.model_config import ModelConfig  # noqa: E402
from rollcast.workers.sampler import SamplerConfig  # noqa: E402
from rollcast.workers.stream_generator import WorkerSpec  # noqa: E402
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate  # noqa: E402

CFG = ModelConfig.preset("tiny")
FRAMES = 21


def spec() -> PipelineSpec:
    worker = WorkerSpec(CFG, CachePolicy.preset("self-forcing"), SamplerConfig.preset("self-forcing"),
                        (64, 64), max_sessions=2)
    return PipelineSpec(worker, vae="tiny")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and a worker node in this machine (Ray's own multi-node test harness)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2, resources={"gpu_fast": 2})  # a "GPU group" of its own
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        monkeypatch.undo()


def frames(pipeline: VideoPipeline, seed: int) -> np.ndarray:
    out: list[np.ndarray] = []
    generate(pipeline, "a red ball", frames=FRAMES, seed=seed, num_steps=2, on_frames=out.append)
    return np.concatenate(out)


def test_ray_stages_match_one_process(cluster: Cluster) -> None:
    want = frames(VideoPipeline.build(spec()), 3)
    pipeline = VideoPipeline.build(spec(), ParallelConfig(3, "ray", rebalance=False).build_runner)
    try:
        got = frames(pipeline, 3)
    finally:
        pipeline.shutdown()
    assert got.shape == want.shape == (FRAMES, 64, 64, 3)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_stage_resources_pin_stages_to_a_group_and_missing_ones_fail_clearly(cluster: Cluster) -> None:
    worker_node = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("gpu_fast"))
    ranges = [range(0, 2), range(2, 4)]
    fast = RayConfig(stage_resources=("gpu_fast", "gpu_fast"), placement_timeout_s=2.0)
    dit = start_pipeline(spec().worker, ranges, "ray", auto_rebalance=False, ray=fast)
    try:
        assert dit.stage_nodes == [worker_node, worker_node]
        # The group exists but this pipeline holds all of it: the next one waits, then says why.
        with pytest.raises(ValueError, match=r"no room in the Ray cluster .* within 2 s"):
            start_pipeline(spec().worker, ranges, "ray", ray=fast)
    finally:
        dit.close()
    # A group the cluster does not have at all fails at once.
    missing = RayConfig(stage_resources=("gpu_h100", "gpu_h100"))
    with pytest.raises(ValueError, match=r"no room in the Ray cluster .*'gpu_h100': 0\.0\} in all"):
        start_pipeline(spec().worker, ranges, "ray", ray=missing)


def test_a_killed_stage_actor_fails_its_pipeline_by_name(cluster: Cluster) -> None:
    pipeline = VideoPipeline.build(spec(), ParallelConfig(2, "ray").build_runner)
    try:
        ray.kill(pipeline.runner.dit.stage_actors[1])  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(PipelineFailedError, match="stage 1"):
            frames(pipeline, 0)
        assert time.monotonic() - t0 < 15
    finally:
        pipeline.shutdown()


def test_killing_a_stage_actor_mid_stream_fails_over_only_its_replica(cluster: Cluster) -> None:
    """Two replicas of two Ray stages each, one live stream on each. A stage actor of replica 0
    is killed mid-stream: its session gets `degraded` (what: pipeline), replica 0 is rebuilt on new
    actors, the session's cache is re-filled from its clean latents and it streams on to its last
    frame (`recovered`); replica 1's stream never notices and equals a single-process run."""
    executors = [LocalExecutor(VideoPipeline.build(spec(), ParallelConfig(2, "ray", rebalance=False)
                                                   .build_runner)) for _ in range(2)]
    events: list[EngineEvent] = []
    chunks: dict[str, list[np.ndarray]] = {}
    killed = threading.Event()

    def on_event(e: EngineEvent) -> None:
        events.append(e)
        if e.kind == "frames_ready":
            chunks.setdefault(e.session_id, []).append(e.data["frames"])  # type: ignore[arg-type]
            if e.session_id == "s0" and not killed.is_set():
                killed.set()
                ray.kill(executors[0].pipeline.runner.dit.stage_actors[1])  # type: ignore[attr-defined]

    cost = CostModel.for_model(CFG, name="tiny-cpu", peak_flops=1e10, half_tokens=100.0, overhead_s=0.01,
                               decode_s_per_latent_frame=0.005)
    engines = [Engine(ex, cost, make_policy("slo-noadmit"), clock=MonotonicClock(), geometry=ex.geometry,
                      config=EngineConfig(max_batch=1, max_lead_s=None), on_event=on_event)
               for ex in executors]
    rs = ReplicaSet(engines)
    old_pids = list(executors[0].pipeline.runner.dit.stage_pids)  # type: ignore[attr-defined]
    slo = SessionSLO(ttff_s=60.0, fps=16.0)

    def run_to_end(*sids: str) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(rs.engine_of(s).sessions[s].state == "active"
                                                  for s in sids):
            time.sleep(0.1)

    rs.start()
    try:
        for i in range(2):
            rs.open_session(SessionRequest(f"s{i}", prompt="a red ball", seed=3, steps=2, slo=slo,
                                           duration_s=FRAMES / 16))
        assert [rs.replica_of("s0"), rs.replica_of("s1")] == [0, 1]
        run_to_end("s0", "s1")
        assert engines[0].pipeline_failures == 1 and engines[1].pipeline_failures == 0
        kinds = [e.kind for e in events if e.session_id == "s0"]
        assert kinds.index("degraded") < kinds.index("recovered")
        degraded = next(e for e in events if e.kind == "degraded" and e.session_id == "s0")
        assert degraded.data["what"] == "pipeline" and "stage 1" in str(degraded.data["reason"])
        assert any(e.kind == "pipeline_rebuilt" for e in events)
        assert executors[0].pipeline.runner.dit.stage_pids != old_pids  # type: ignore[attr-defined]
        want = frames(VideoPipeline.build(spec()), 3)
        # The survivor: every frame, equal to one process.
        assert engines[1].sessions["s1"].state == "finished"
        assert np.abs(np.concatenate(chunks["s1"])[:FRAMES].astype(int) - want).max() <= 1
        # The resumed one: every frame; those before the loss equal one process (after it, its
        # cache was re-filled in one pass, so they are close rather than equal).
        assert engines[0].sessions["s0"].state == "finished"
        got = np.concatenate(chunks["s0"])
        assert len(got) >= FRAMES
        first = len(chunks["s0"][0])
        assert np.abs(got[:first].astype(int) - want[:first]).max() <= 1
        # The rebuilt replica serves a new stream exactly.
        rs.open_session(SessionRequest("s2", prompt="a red ball", seed=3, steps=2, slo=slo,
                                       duration_s=FRAMES / 16))
        assert rs.replica_of("s2") == 0
        run_to_end("s2")
        assert engines[0].sessions["s2"].state == "finished"
        assert np.abs(np.concatenate(chunks["s2"])[:FRAMES].astype(int) - want).max() <= 1
    finally:
        rs.stop()
        for ex in executors:
            ex.pipeline.shutdown()
