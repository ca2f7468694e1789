"""Pipelines on Ray: stages as actors in a placement group on a (simulated) two-node cluster give
the same frames as one process; a killed actor fails its pipeline fast and by name."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from rollcast.pipeline_parallel.parallel_config import ParallelConfig  # noqa: E402
from rollcast.pipeline_parallel.pipeline_dit import PipelineFailedError  # noqa: E402
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
    c.add_node(num_cpus=2)
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
