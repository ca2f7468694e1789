"""Video-to-video input readiness: a block starts only once its input frames are there, work of
blocks under way goes on meanwhile, a wait for input is no session failure and a chunk made late
by it is told apart from a scheduling miss; input pushed from another thread while the engine
thread runs reaches the model in order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rollcast.scheduler.clock import FakeClock, MonotonicClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine
from rollcast.scheduler.events import EngineEvent
from rollcast.scheduler.executor import SimulatedExecutor
from rollcast.scheduler.local_executor import LocalExecutor
from rollcast.scheduler.policies import make_policy
from rollcast.scheduler.session import BlockGeometry, SessionRequest, SessionSLO
from rollcast.scheduler.work import ForwardShape, MicroBatch
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate

GEO = BlockGeometry(ForwardShape(latent_frames=1, tokens_per_frame=100, kv_frames=1, resolution=(64, 64)),
                    context_pass=False)


class GatedInput(SimulatedExecutor):
    """Simulated time; sessions in `waiting` have no input for their next block."""

    def __init__(self, clock: FakeClock, cost: CostModel) -> None:
        super().__init__(clock, cost, jitter=0.0)
        self.waiting: set[str] = set()
        self.submitted: list[MicroBatch] = []

    def ready(self, session_id: str) -> bool:
        return session_id not in self.waiting

    def submit(self, batch: MicroBatch) -> None:
        self.submitted.append(batch)
        super().submit(batch)


def linear_cost() -> CostModel:
    """0.05 + 0.1·b seconds per forward of b items, no codec time."""
    return CostModel("linear", linear_flops_per_token=1e6, attn_flops_per_pair=0.0, text_len=0,
                     peak_flops=1e9, half_tokens=0.0, overhead_s=0.05, decode_s_per_latent_frame=0.0,
                     encode_s_per_latent_frame=0.0)


def scheduled(ex: GatedInput, sid: str, since: int = 0) -> list[tuple[int, int]]:
    return [(i.block, i.step) for b in ex.submitted[since:] for i in b.items if i.session_id == sid]


def test_a_session_without_input_waits_while_others_run() -> None:
    clock = FakeClock()
    cost = linear_cost()
    ex = GatedInput(clock, cost)
    engine = Engine(ex, cost, make_policy("slo-noadmit"), clock=clock, geometry=lambda r: GEO)
    slo = SessionSLO(ttff_s=1.0, fps=4.0)
    for sid in ("a", "b"):
        engine.open_session(SessionRequest(sid, mode="v2v", steps=2, slo=slo, duration_s=3.0))
    a = engine.sessions["a"]
    ex.waiting.add("a")  # a's client sends its first frames only at t = 2
    engine.run_until(2.0)
    assert scheduled(ex, "a") == [] and len(scheduled(ex, "b")) >= 6
    assert a.state == "active" and a.stats.chunks == 0 and a.input_wait is not None

    ex.waiting.clear()
    while a.step == 0:  # a starts its block 0 ...
        assert engine.tick()
    ex.waiting.add("a")  # ... and its input for block 1 is late again
    n = len(ex.submitted)
    engine.run_until(clock.now() + 1.0)
    assert scheduled(ex, "a", n) == [(0, 1)]  # the block under way finishes; block 1 waits
    assert a.stats.chunks == 1 and a.lane_block == [1]
    ex.waiting.clear()
    engine.run_until(20.0)
    assert a.state == "finished" and engine.sessions["b"].state == "finished"
    blocks = [e.data["block"] for e in engine.events if e.kind == "frames_ready" and e.session_id == "a"]
    assert blocks == list(range(a.total_blocks or 0))
    # Block 0 was due at t = 1 and came after 2: late, but by less than it waited for input; the
    # later blocks stay behind by what the stream waited for input, and no more.
    misses = [e for e in engine.events if e.kind == "deadline_miss" and e.session_id == "a"]
    assert [m.data["block"] for m in misses] == blocks
    assert all(m.data["cause"] == "input" for m in misses)
    assert misses[0].data["input_delay_s"] >= misses[0].data["late_s"] > 0.9
    assert a.stats.input_late_chunks == a.stats.late_chunks == len(blocks)
    assert a.stats.input_wait_s == pytest.approx(a.input_delay_s) and a.input_delay_s > 2.5
    assert not [e for e in engine.events if e.kind == "failed"]


def v2v_pipeline() -> VideoPipeline:
    worker = WorkerSpec(config=ModelConfig.preset("tiny"), policy=CachePolicy.preset("streamdiffusionv2"),
                        sampler=SamplerConfig.preset("streamdiffusionv2-v2v"), resolution=(64, 64),
                        max_sessions=2, frames_per_block=1)
    return VideoPipeline.build(PipelineSpec(worker=worker))


@pytest.fixture(scope="module")
def v2v() -> VideoPipeline:
    return v2v_pipeline()


@pytest.mark.parametrize("policy", ["slo-noadmit", "fifo"])
def test_v2v_input_pushed_in_pieces_from_another_thread(v2v: VideoPipeline, policy: str) -> None:
    executor = LocalExecutor(v2v)
    cost = CostModel.for_model(ModelConfig.preset("tiny"), name="tiny-cpu", peak_flops=1e10,
                               half_tokens=100.0, overhead_s=0.01, decode_s_per_latent_frame=0.005)
    events: list[EngineEvent] = []
    done = threading.Event()

    def on_event(e: EngineEvent) -> None:
        events.append(e)
        if e.kind in ("finished", "failed"):
            done.set()

    engine = Engine(executor, cost, make_policy(policy), clock=MonotonicClock(),
                    geometry=executor.geometry, on_event=on_event)
    frames = np.random.default_rng(3).integers(0, 256, (13, 64, 64, 3), dtype=np.uint8)
    pieces = [1, 3, 2, 4, 3]  # across block boundaries (blocks take 1, 4, 4, 4 frames)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            at = 0
            for n in pieces:
                time.sleep(0.05)
                engine.push_input("v", frames[at:at + n])
                at += n
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    engine.start()
    try:
        d = engine.open_session(SessionRequest("v", mode="v2v", prompt="a red circle", seed=4, steps=2,
                                               slo=SessionSLO(ttff_s=5.0, fps=16.0), duration_s=13 / 16))
        assert d.outcome == "admitted"
        pusher = threading.Thread(target=client)
        pusher.start()
        assert done.wait(60), "the session did not finish"
        pusher.join(5)
    finally:
        engine.stop()
    assert not errors
    rec = engine.sessions["v"]
    assert rec.state == "finished", rec.error
    chunks = [e.data for e in events if e.kind == "frames_ready"]
    assert [c["block"] for c in chunks] == [0, 1, 2, 3]
    assert [len(c["frames"]) for c in chunks] == [1, 4, 4, 4]
    assert rec.stats.input_wait_s > 0  # it did wait for its input, and did not fail
    assert v2v.runner.pool.free_rows == 2 and engine.push_input("v", frames[:1]) == 0
    if policy == "slo-noadmit":  # one lane: the same frames as the whole input given at once
        alone: list[np.ndarray] = []
        generate(v2v, "a red circle", frames=13, seed=4, num_steps=2, input_frames=frames,
                 on_frames=alone.append)
        got = np.concatenate([c["frames"] for c in chunks])
        assert np.abs(got.astype(int) - np.concatenate(alone).astype(int)).max() <= 1
