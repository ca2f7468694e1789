"""Stream batching (one lane per denoising step, StreamDiffusionV2's stream batch) on the real tiny
model behind the engine: sessions run to the end with every chunk in order, one session's frames
equal a hand-run reference of its lanes, and setups that do not fit are refused cleanly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rollcast.scheduler.clock import MonotonicClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.events import EngineEvent
from rollcast.scheduler.local_executor import LocalExecutor, lane_seed
from rollcast.scheduler.policies import make_policy
from rollcast.scheduler.session import SessionRequest, SessionSLO
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.stream_state import BlockInput, StreamState
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, VideoSession

SLO = SessionSLO(ttff_s=5.0, fps=16.0)


def build(policy: str, sampler: str, rows: int) -> VideoPipeline:
    worker = WorkerSpec(config=ModelConfig.preset("tiny"), policy=CachePolicy.preset(policy),
                        sampler=SamplerConfig.preset(sampler), resolution=(64, 64), max_sessions=rows,
                        frames_per_block=1)  # StreamDiffusionV2's 1-frame blocks
    return VideoPipeline.build(PipelineSpec(worker=worker))


@pytest.fixture(scope="module")
def sdv2() -> VideoPipeline:
    return build("streamdiffusionv2", "streamdiffusionv2", rows=4)


def tiny_cost() -> CostModel:
    return CostModel.for_model(ModelConfig.preset("tiny"), name="tiny-cpu", peak_flops=1e10,
                               half_tokens=100.0, overhead_s=0.01, decode_s_per_latent_frame=0.005)


def frames_by_session(events: list[EngineEvent]) -> dict[str, list[tuple[int, int, np.ndarray]]]:
    out: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for e in events:
        if e.kind == "frames_ready":
            entry = (e.data["block"], e.data["first_frame"], e.data["frames"])
            out.setdefault(e.session_id, []).append(entry)
    return out


def test_two_stream_batched_sessions_through_the_engine(sdv2: VideoPipeline) -> None:
    executor = LocalExecutor(sdv2)
    events: list[EngineEvent] = []
    done = threading.Event()

    def on_event(e: EngineEvent) -> None:
        events.append(e)
        if sum(x.kind in ("finished", "failed") for x in events) == 2:
            done.set()

    engine = Engine(executor, tiny_cost(), make_policy("fifo"), clock=MonotonicClock(),
                    geometry=executor.geometry, on_event=on_event)
    for i, p in enumerate(["a red circle", "waves"]):
        # 13 frames at 16 fps: blocks of 1 + 4 + 4 + 4 frames.
        d = engine.open_session(SessionRequest(f"s{i}", prompt=p, seed=i, steps=2, slo=SLO,
                                               duration_s=13 / 16))
        assert d.outcome == "admitted" and engine.sessions[f"s{i}"].lanes == 2
    # Both sessions hold two rows each: a third stream batch finds no room and is turned away.
    full = engine.open_session(SessionRequest("s2", steps=2, slo=SLO, duration_s=1.0))
    assert full.outcome == "rejected" and full.reason == "capacity_exhausted" and full.retry_after_s
    five = engine.open_session(SessionRequest("s5", steps=5, slo=SLO))  # the sampler has 4
    assert five.outcome == "rejected" and five.reason == "unsupported"
    assert "between 1 and 4" in (five.detail or "")
    with pytest.raises(ValueError, match="keeps its step count"):
        engine.set_steps("s0", 1)
    engine.start()
    try:
        assert done.wait(60), f"sessions still running: {set(engine.active)}"
    finally:
        engine.stop()
    assert [engine.sessions[f"s{i}"].state for i in (0, 1, 2, 5)] == ["finished"] * 2 + ["rejected"] * 2
    got = frames_by_session(events)
    for i in range(2):
        chunks = got[f"s{i}"]
        assert [b for b, _, _ in chunks] == [0, 1, 2, 3]
        assert [f for _, f, _ in chunks] == [0, 1, 5, 9]
        assert [c.shape for _, _, c in chunks] == [(1, 64, 64, 3)] + [(4, 64, 64, 3)] * 3
    # A session's lanes ran together: two items per forward once its pipeline was full.
    assert max(engine.sessions["s0"].stats.batch_sizes) == 2
    assert sdv2.runner.pool.free_rows == 4 and not executor.streams  # every row went back


def reference_lanes(pipe: VideoPipeline, prompts: list[str], seed: int, steps: int, blocks: int,
                    switch_at: list[int], renoise_to: int = 1) -> np.ndarray:
    """Run a stream batch by hand: block after block, lane after lane, one lane per forward.
    Lane i switches to prompts[1] from block switch_at[i] on; its x0 goes to lane i + 1 noised to
    σ of lane i + renoise_to (1: the next lane's level, as it must be)."""
    runner = pipe.runner
    ts = runner.sampler.timesteps(steps)
    kv = [pipe.prompt_kv(pipe.embed(p)) for p in prompts]
    video = pipe.open("ref", prompts[0], seed=seed, num_steps=steps)
    lanes = [video.state] + [runner.open(f"ref{i}", kv[0], seed=lane_seed(seed, i), v2v=True)
                             for i in range(1, steps)]
    for i, st in enumerate(lanes):
        st.timesteps = [ts[i]]
    out = []
    try:
        for b in range(blocks):
            for i, st in enumerate(lanes):
                if b == switch_at[i]:
                    runner.set_prompt(st, kv[1])
                (x0,) = runner.run([st])
                assert x0 is not None
                if i + 1 < steps:  # re-noised to the next lane's level with that lane's noise
                    sigma = runner.sampler.sigma(ts[i + renoise_to])
                    runner.add_input(lanes[i + 1], BlockInput(x0, sigma, ts[i + 1]))
            out.append(video.decode(x0))
    finally:
        for st in lanes[1:]:
            runner.close(st)
        pipe.close(video)
    return np.concatenate(out)


def test_lanes_equal_a_hand_run_reference_with_a_prompt_switch(
        sdv2: VideoPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three lanes pipelined through the engine (lane i on block b - i, all in one forward) give
    the blocks of running each lane's block by hand in block order, and a prompt change reaches
    every lane at the same block, not at the same moment."""
    latents: dict[str, list[torch.Tensor]] = {}  # each block's output latents, as decoded
    decode = VideoSession.decode

    def keep(self: VideoSession, x0: torch.Tensor, lane: StreamState | None = None) -> np.ndarray:
        latents.setdefault(self.state.session_id, []).append(x0.clone())
        return decode(self, x0, lane)

    monkeypatch.setattr(VideoSession, "decode", keep)
    executor = LocalExecutor(sdv2)
    events: list[EngineEvent] = []
    engine = Engine(executor, tiny_cost(), make_policy("fifo"), clock=MonotonicClock(),
                    geometry=executor.geometry, on_event=events.append,
                    config=EngineConfig(max_lead_s=None))  # stepped by hand: no playout pacing
    blocks = 6
    d = engine.open_session(SessionRequest("a", prompt="a red circle", seed=11, steps=3, slo=SLO,
                                           duration_s=(1 + 4 * (blocks - 1)) / 16))
    assert d.outcome == "admitted"
    rec = engine.sessions["a"]
    while rec.lane_block[0] < 3:  # lane 0 is on block 3 while lanes 1 and 2 are on blocks 2 and 1
        assert engine.tick()
    assert rec.lane_block == [3, 2, 1]
    first_frame = engine.set_prompt("a", "waves")
    switch_block = 3
    assert first_frame == rec.geometry.first_frame_of(switch_block)
    while engine.tick():
        pass
    assert rec.state == "finished"
    assert max(rec.stats.batch_sizes) == 3  # all three lanes in one forward
    got = np.concatenate([c for _, _, c in frames_by_session(events)["a"]])
    prompts = ["a red circle", "waves"]
    want = reference_lanes(sdv2, prompts, seed=11, steps=3, blocks=blocks, switch_at=[switch_block] * 3)
    assert got.shape == want.shape == (21, 64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    engine_x0, ref_x0 = torch.stack(latents.pop("a")), torch.stack(latents.pop("ref"))
    torch.testing.assert_close(engine_x0, ref_x0, rtol=1e-4, atol=1e-4)
    # The test can tell: switching every lane at the moment of the call (lane i at block 3 - i),
    # or a lane's input noised to its own level instead of the next lane's, gives other blocks.
    reference_lanes(sdv2, prompts, seed=11, steps=3, blocks=blocks, switch_at=[3, 2, 1])
    assert (torch.stack(latents.pop("ref")) - engine_x0).abs().max() > 1e-2  # 100x the tolerance
    reference_lanes(sdv2, prompts, seed=11, steps=3, blocks=blocks, switch_at=[3, 3, 3], renoise_to=0)
    assert (torch.stack(latents.pop("ref")) - engine_x0).abs().max() > 1e-2
    assert sdv2.runner.pool.free_rows == 4


def test_stream_batch_with_a_context_pass_is_refused_and_others_run_on() -> None:
    pipe = build("self-forcing", "self-forcing", rows=3)
    executor = LocalExecutor(pipe)
    events: list[EngineEvent] = []
    engine = Engine(executor, tiny_cost(), make_policy("fifo"), clock=MonotonicClock(),
                    geometry=executor.geometry, on_event=events.append,
                    config=EngineConfig(max_lead_s=None))  # stepped by hand: no playout pacing
    # One step is one lane: fine under any policy.
    one = SessionRequest("one", steps=1, slo=SLO, duration_s=9 / 16)
    assert engine.open_session(one).outcome == "admitted"
    assert engine.tick()
    d = engine.open_session(SessionRequest("two", steps=2, slo=SLO, duration_s=1.0))
    assert d.outcome == "rejected" and d.reason == "unsupported"
    assert "context pass" in (d.detail or "") and "self-forcing" in (d.detail or "")
    rejected = [e for e in events if e.kind == "rejected"]
    assert [e.session_id for e in rejected] == ["two"] and rejected[0].data["reason"] == "unsupported"
    assert engine.sessions["two"].state == "rejected" and "two" not in engine.active
    assert "two" not in executor.streams and pipe.runner.pool.free_rows == 2  # nothing of it stayed
    with pytest.raises(KeyError):
        engine.set_prompt("two", "x")
    while engine.tick():
        pass
    assert engine.sessions["one"].state == "finished"
    assert [b for b, _, _ in frames_by_session(events)["one"]] == [0, 1, 2]
    assert pipe.runner.pool.free_rows == 3
