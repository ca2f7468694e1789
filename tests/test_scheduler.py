"""The scheduler on a fake clock: least-slack order, batch growth that stops at a deadline, the
admission boundary, degradation and recovery, and a reproducible simulator."""

from __future__ import annotations

import pytest

from rollcast.scheduler.admission import AdmissionConfig, AdmissionController, step_levels
from rollcast.scheduler.clock import FakeClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.executor import SimulatedExecutor
from rollcast.scheduler.policies import FIFOStreamBatch, SLOBatching, make_policy
from rollcast.scheduler.session import BlockGeometry, SessionRecord, SessionRequest, SessionSLO
from rollcast.scheduler.simulator import Workload, simulate
from rollcast.scheduler.work import ForwardShape

SHAPE = ForwardShape(latent_frames=1, tokens_per_frame=100, kv_frames=1, resolution=(64, 64))
GEO = BlockGeometry(SHAPE, context_pass=False)


def linear_cost() -> CostModel:
    """A forward of b items takes 0.05 + 0.1·b seconds (no batching gain, no decode)."""
    return CostModel("linear", linear_flops_per_token=1e6, attn_flops_per_pair=0.0, text_len=0,
                     peak_flops=1e9, half_tokens=0.0, overhead_s=0.05, decode_s_per_latent_frame=0.0,
                     encode_s_per_latent_frame=0.0)


def record(sid: str, ttff: float, *, now: float = 0.0, steps: int = 1, fps: float = 16.0,
           min_steps: int | None = None, duration: float | None = None) -> SessionRecord:
    req = SessionRequest(sid, steps=steps, slo=SessionSLO(ttff_s=ttff, fps=fps, min_steps=min_steps),
                         duration_s=duration)
    rec = SessionRecord(req, GEO, t_arrival=now)
    rec.admit(now)
    return rec


def test_cost_model_used_by_the_tests_is_linear() -> None:
    from rollcast.scheduler.work import BatchShape
    c = linear_cost()
    assert [round(c.predict(BatchShape(b, SHAPE)), 9) for b in (1, 2, 3)] == [0.15, 0.25, 0.35]


def test_least_slack_goes_first() -> None:
    recs = [record("loose", 5.0), record("tight", 0.5), record("medium", 1.0)]
    batch = SLOBatching().next_batch(0.0, recs, linear_cost(), max_batch=1)
    assert batch is not None and [i.session_id for i in batch.items] == ["tight"]
    # More remaining work means less slack: 4 steps left at a later deadline can be more urgent.
    recs = [record("few", 0.5, steps=1), record("many", 0.6, steps=4)]
    batch = SLOBatching().next_batch(0.0, recs, linear_cost(), max_batch=1)
    assert [i.session_id for i in batch.items] == ["many"]


@pytest.mark.parametrize(("tight_ttff", "expected"), [(0.2, 1), (0.3, 2), (0.4, 3)])
def test_batch_grows_only_while_every_deadline_holds(tight_ttff: float, expected: int) -> None:
    recs = [record("tight", tight_ttff), record("b", 10.0), record("c", 10.0)]
    batch = SLOBatching().next_batch(0.0, recs, linear_cost(), max_batch=8)
    assert batch.items[0].session_id == "tight"
    assert len(batch.items) == expected  # 0.15 / 0.25 / 0.35 s for 1 / 2 / 3 items
    assert batch.predicted_s == pytest.approx(0.05 + 0.1 * expected)


def test_a_lost_cause_does_not_block_batching() -> None:
    recs = [record("late", 0.01), record("b", 10.0), record("c", 10.0)]
    batch = SLOBatching().next_batch(0.0, recs, linear_cost(), max_batch=8)
    assert len(batch.items) == 3  # "late" misses anyway; nobody else is put at risk


def test_fifo_runs_one_session_as_a_stream_batch() -> None:
    fifo = FIFOStreamBatch()
    req = SessionRequest("a", steps=3)
    rec = SessionRecord(req, GEO, t_arrival=0.0)
    rec.admit(0.0, lanes=fifo.lanes(req))
    assert rec.lanes == 3
    assert [i.lane for i in rec.ready_items()] == [0]  # the pipeline fills one lane at a time
    for lane in range(3):
        batch = fifo.next_batch(0.0, [rec], linear_cost(), max_batch=8)
        assert [i.lane for i in batch.items] == list(range(lane + 1))
        for item in batch.items:
            rec.advance(item)
    assert rec.blocks_done == 1  # block 0 went through all three lanes
    assert [(i.lane, i.block) for i in rec.ready_items()] == [(0, 3), (1, 2), (2, 1)]


# -- admission ---------------------------------------------------------------------------------


def controller(max_util: float) -> AdmissionController:
    return AdmissionController(AdmissionConfig(max_utilization=max_util, max_queue=4,
                                               max_queue_wait_s=30.0), linear_cost(), max_batch=8)


def test_admission_boundary_is_predicted_load() -> None:
    # One session alone: 4 blocks/s x 0.15 s = 0.6; two sharing each forward: 2 x 4 x 0.125 = 1.0.
    a = record("a", 1.0)
    new = SessionRecord(SessionRequest("b", steps=1, slo=SessionSLO(ttff_s=1.0)), GEO, t_arrival=0.0)
    assert controller(0.6).load([]) == 0.0
    ok = controller(1.0).decide(new, [a], now=0.0, queue_len=0)
    assert ok.outcome == "admitted" and ok.predicted_load == pytest.approx(1.0)
    full = controller(0.99).decide(new, [a], now=0.0, queue_len=0)
    assert full.outcome == "rejected" and full.reason == "capacity_exhausted"
    assert full.retry_after_s == 5.0  # nobody has a known end: the default estimate


def test_queue_when_a_slot_frees_up_soon_and_reject_infeasible_slos() -> None:
    a = record("a", 1.0, duration=4.0)
    new = SessionRecord(SessionRequest("b", steps=1, slo=SessionSLO(ttff_s=1.0)), GEO, t_arrival=2.0)
    d = controller(0.9).decide(new, [a], now=2.0, queue_len=0)
    assert d.outcome == "queued" and d.queue_position == 1
    assert d.estimated_wait_s == pytest.approx(3.0)  # a ends at 0 + 1 (ttff) + 4
    impossible = SessionRecord(SessionRequest("c", steps=1, slo=SessionSLO(ttff_s=0.1)), GEO, t_arrival=0.0)
    d = controller(0.9).decide(impossible, [], now=0.0, queue_len=0)
    assert d.outcome == "rejected" and d.reason == "slo_infeasible"
    too_fast = SessionRecord(SessionRequest("d", steps=1, slo=SessionSLO(fps=40.0)), GEO, t_arrival=0.0)
    assert controller(0.9).decide(too_fast, [], now=0.0, queue_len=0).reason == "slo_infeasible"


def test_step_levels_halve_down_to_the_floor() -> None:
    assert step_levels(4, 1) == [4, 2, 1]
    assert step_levels(4, 2) == [4, 2]
    assert step_levels(3, 1) == [3, 1]
    assert step_levels(4, None) == [4]


# -- degradation and recovery on the engine ------------------------------------------------------------


def test_degrade_to_admit_then_recover_when_load_falls() -> None:
    clock = FakeClock()
    cost = linear_cost()
    ex = SimulatedExecutor(clock, cost, jitter=0.0)
    engine = Engine(ex, cost, make_policy("slo"), clock=clock, geometry=lambda r: GEO,
                    config=EngineConfig(admission=AdmissionConfig(max_utilization=0.9)))
    slo = SessionSLO(ttff_s=2.0, fps=4.0, min_steps=1)
    # At 4 fps one block per second; 4 steps alone cost 4 x 0.15 = 0.6 of the executor.
    assert engine.open_session(SessionRequest("a", steps=4, slo=slo)).outcome == "admitted"
    d = engine.open_session(SessionRequest("b", steps=4, slo=slo))
    # Two at 4 steps, sharing forwards: 2 x 4 x 0.125 = 1.0 > 0.9; one at 2 steps: 0.75.
    assert d.outcome == "admitted" and len(d.degrade) == 1 and d.degrade[0][1] == 2
    assert d.predicted_load == pytest.approx(0.75)
    degraded = [e for e in engine.events if e.kind == "degraded"]
    assert degraded and all(e.data["what"] == "steps" for e in degraded)
    engine.run_until(3.0)
    sid = d.degrade[0][0]
    assert sid == "a"  # equal savings: the first in line gives way
    # From its next block on it ran with 2 steps.
    steps_a = [e.data["steps"] for e in engine.events if e.kind == "frames_ready" and e.session_id == "a"]
    assert steps_a[1] == 2
    engine.close_session("b")
    engine.run_until(12.0)
    # When the load falls (b degraded too, then gone) it recovers, and stays recovered alone.
    changes = [e for e in engine.events if e.kind in ("degraded", "recovered") and e.session_id == "a"]
    assert changes[0].kind == "degraded" and changes[-1].kind == "recovered"
    assert engine.sessions["a"].steps == 4
    assert engine.sessions["a"].state == "active"


def test_chunks_come_in_order_and_sessions_finish() -> None:
    clock = FakeClock()
    cost = linear_cost()
    engine = Engine(SimulatedExecutor(clock, cost), cost, make_policy("slo-noadmit"), clock=clock,
                    geometry=lambda r: GEO)
    for i in range(3):
        engine.open_session(SessionRequest(f"s{i}", steps=1, slo=SessionSLO(ttff_s=2.0, fps=8.0),
                                           duration_s=2.0))
    engine.run_until(30.0)
    for i in range(3):
        ready = [e for e in engine.events if e.kind == "frames_ready" and e.session_id == f"s{i}"]
        blocks = [e.data["block"] for e in ready]
        frames = sum(e.data["num_frames"] for e in ready)
        assert blocks == list(range(len(blocks))) and frames >= 16  # 2 s at 8 fps
        assert engine.sessions[f"s{i}"].state == "finished"
    assert engine.batched_items / engine.batches > 1  # they shared forwards


def test_simulator_is_reproducible_from_its_seed() -> None:
    cost = CostModel.preset("h100-wan-1.3b-480p")
    w = Workload(rate=0.3, duration_s=30, session_seconds=5, seed=3)
    a, b = simulate("slo", cost, w), simulate("slo", cost, w)
    assert a == b
    c = simulate("slo", cost, Workload(rate=0.3, duration_s=30, session_seconds=5, seed=4))
    assert c["per_session"] != a["per_session"]
    assert a["sessions"] == a["admitted"] + sum(s["admission_wait_s"] is None for s in a["per_session"])
    for key in ("slo_attainment", "goodput_sessions_per_s", "p50_ttff_ms", "p99_ttff_ms",
                "deadline_miss_rate", "mean_batch_size", "queued"):
        assert key in a
