"""The real tiny model behind the engine: four concurrent sessions on CPU, batched together, every
chunk delivered in order, and each session's frames the same as when it runs alone."""

from __future__ import annotations

import threading

import numpy as np

from rollcast.scheduler.clock import MonotonicClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.events import EngineEvent
from rollcast.scheduler.local_executor import LocalExecutor
from rollcast.scheduler.policies import make_policy
from rollcast.scheduler.session import SessionRequest, SessionSLO
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate


def test_four_sessions_through_the_engine() -> None:
    cfg = ModelConfig.preset("tiny")
    worker = WorkerSpec(config=cfg, policy=CachePolicy.preset("self-forcing"),
                        sampler=SamplerConfig.preset("self-forcing"), resolution=(64, 64), max_sessions=5)
    pipeline = VideoPipeline.build(PipelineSpec(worker=worker))
    executor = LocalExecutor(pipeline)
    base = CostModel.for_model(cfg, name="tiny-cpu", peak_flops=1e10, half_tokens=100.0, overhead_s=0.01,
                               decode_s_per_latent_frame=0.005)
    cost = executor.profile(base, batch_sizes=(1, 2), repeats=1)
    assert cost.peak_flops > 0 and pipeline.runner.pool.free_rows == 5  # profile rows returned

    chunks: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    done = threading.Event()
    finished: set[str] = set()

    def on_event(e: EngineEvent) -> None:
        if e.kind == "frames_ready":
            entry = (e.data["block"], e.data["first_frame"], e.data["frames"])
            chunks.setdefault(e.session_id, []).append(entry)
        if e.kind in ("finished", "failed"):
            finished.add(e.session_id)
            if len(finished) == 4:
                done.set()

    engine = Engine(executor, cost, make_policy("slo-noadmit"), clock=MonotonicClock(),
                    geometry=executor.geometry, config=EngineConfig(max_batch=4), on_event=on_event)
    prompts = ["a red circle", "a blue square", "waves", "a red circle"]
    engine.start()
    try:
        for i, p in enumerate(prompts):
            # 33 frames at 16 fps: blocks of 9 + 12 + 12 frames.
            d = engine.open_session(SessionRequest(f"s{i}", prompt=p, seed=i, steps=2,
                                                   slo=SessionSLO(ttff_s=5.0, fps=16.0), duration_s=33 / 16))
            assert d.outcome == "admitted"
        assert done.wait(120), f"sessions still running: {set(engine.active)}"
    finally:
        engine.stop()
    assert all(engine.sessions[f"s{i}"].state == "finished" for i in range(4))
    assert engine.batched_items / engine.batches > 1.5  # sessions shared forwards
    for i, p in enumerate(prompts):
        got = chunks[f"s{i}"]
        assert [b for b, _, _ in got] == [0, 1, 2]
        assert [f for _, f, _ in got] == [0, 9, 21]
        frames = np.concatenate([c for _, _, c in got])
        alone: list[np.ndarray] = []
        generate(pipeline, p, frames=33, seed=i, num_steps=2, on_frames=alone.append)
        # Batched with others or alone: the same frames (up to one level of float rounding).
        assert np.abs(frames.astype(int) - np.concatenate(alone).astype(int)).max() <= 1
    assert pipeline.runner.pool.free_rows == 5  # every row went back


def test_step_change_at_a_block_boundary_keeps_engine_and_worker_in_step() -> None:
    """A step change asked for while the next block has not started (here: while the finished
    block's context pass is pending) applies from the block after it, on both sides."""
    worker = WorkerSpec(config=ModelConfig.preset("tiny"), policy=CachePolicy.preset("self-forcing"),
                        sampler=SamplerConfig.preset("self-forcing"), resolution=(64, 64), max_sessions=1,
                        frames_per_block=1)
    executor = LocalExecutor(VideoPipeline.build(PipelineSpec(worker=worker)))
    cost = CostModel.for_model(worker.config, name="tiny-cpu", peak_flops=1e10, half_tokens=100.0,
                               overhead_s=0.01, decode_s_per_latent_frame=0.005)
    engine = Engine(executor, cost, make_policy("slo-noadmit"), clock=MonotonicClock(),
                    geometry=executor.geometry)
    # 13 frames: blocks of 1 + 4 + 4 + 4 frames.
    engine.open_session(SessionRequest("a", steps=2, slo=SessionSLO(ttff_s=5.0), duration_s=13 / 16))
    rec = engine.sessions["a"]
    while not rec.context_pending:
        assert engine.tick()
    assert rec.lane_block == [1]
    assert engine.set_steps("a", 1) == rec.geometry.first_frame_of(2)
    while engine.tick():
        pass
    assert rec.state == "finished", rec.error
    ready = [e.data for e in engine.events if e.kind == "frames_ready"]
    assert [(d["block"], d["steps"]) for d in ready] == [(0, 2), (1, 2), (2, 1), (3, 1)]
    # Forwards: steps + context pass per block (the last block's context pass never runs).
    assert len(rec.stats.batch_sizes) == 3 + 3 + 2 + 1
