"""Replicas: sessions go to the pipeline where admission predicts the most slack, every later call
reaches the same one, and a pipeline that loses a stage ends its sessions (degraded, then failed
with the reason), is rebuilt, and takes new sessions again while the other keeps serving."""

from __future__ import annotations

from rollcast.scheduler.admission import AdmissionConfig, AdmissionDecision
from rollcast.scheduler.clock import FakeClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.executor import SimulatedExecutor
from rollcast.scheduler.policies import make_policy
from rollcast.scheduler.replica_set import ReplicaSet, placement_score
from rollcast.scheduler.session import BlockGeometry, SessionRequest, SessionSLO
from rollcast.scheduler.work import ForwardShape

GEO = BlockGeometry(ForwardShape(latent_frames=1, tokens_per_frame=100, kv_frames=1, resolution=(64, 64)),
                    context_pass=False)


def linear_cost() -> CostModel:
    """A forward of b items takes 0.05 + 0.1·b seconds."""
    return CostModel("linear", linear_flops_per_token=1e6, attn_flops_per_pair=0.0, text_len=0,
                     peak_flops=1e9, half_tokens=0.0, overhead_s=0.05, decode_s_per_latent_frame=0.0,
                     encode_s_per_latent_frame=0.0)


def replicas(n: int) -> tuple[ReplicaSet, list[SimulatedExecutor], FakeClock]:
    clock = FakeClock()
    executors = [SimulatedExecutor(clock, linear_cost(), jitter=0.0) for _ in range(n)]
    engines = [Engine(ex, linear_cost(), make_policy("slo"), clock=clock, geometry=lambda r: GEO,
                      config=EngineConfig(admission=AdmissionConfig(max_utilization=0.9)))
               for ex in executors]
    return ReplicaSet(engines), executors, clock


def request(sid: str, steps: int = 1, duration: float | None = None) -> SessionRequest:
    return SessionRequest(sid, steps=steps, slo=SessionSLO(ttff_s=2.0, fps=4.0), duration_s=duration)


def test_sessions_go_where_the_predicted_slack_is_largest() -> None:
    rs, _, _ = replicas(2)
    placed = []
    # At 4 fps a 1-step session loads a replica 4 x 0.15 = 0.6, a 2-step one more: each new one
    # goes to the emptier replica; ties go to the lower index.
    for sid, steps in [("a", 2), ("b", 1), ("c", 1)]:
        assert rs.open_session(request(sid, steps)).outcome == "admitted"
        placed.append(rs.replica_of(sid))
    assert placed == [0, 1, 1]
    loads = [float(s["predicted_load"]) for s in rs.snapshot()["replicas"]]  # type: ignore[union-attr]
    assert loads[0] > loads[1] > 0  # "c" joined "b": a 2-step session costs more than two 1-step ones
    # Calls for a session reach its replica only.
    rs.set_prompt("c", "new prompt")
    rs.close_session("a")
    assert rs.engines[0].sessions["a"].state == "finished"
    assert rs.engines[1].sessions["c"].state == "active"
    assert "a" not in rs.engines[1].sessions


def test_placement_prefers_admission_without_degrading_then_queue_wait() -> None:
    room = AdmissionDecision("admitted", predicted_load=0.5)
    tighter = AdmissionDecision("admitted", predicted_load=0.8)
    degrading = AdmissionDecision("admitted", degrade=(("x", 1),), predicted_load=0.2)
    queued = AdmissionDecision("queued", "capacity_exhausted", estimated_wait_s=1.0)
    rejected = AdmissionDecision("rejected", "capacity_exhausted")
    order = sorted([rejected, queued, degrading, tighter, room], key=lambda d: placement_score(d, 0.9))
    assert order == [room, tighter, degrading, queued, rejected]


def test_a_lost_pipeline_is_rebuilt_its_sessions_resume_and_the_other_serves_on() -> None:
    rs, executors, clock = replicas(2)
    for sid in ("a", "b", "c"):
        rs.open_session(request(sid, duration=3.0))
    assert [rs.replica_of(s) for s in "abc"] == [0, 1, 0]
    lost, kept = rs.engines
    lost.tick()
    executors[0].lose_pipeline = "stage 1 (Ray actor) died"
    executors[0].drop_on_rebuild = {"c"}  # e.g. a stream-batched session: cannot be carried over
    lost.tick()  # the next result reports it; the next tick rebuilds
    lost.tick()
    kinds = [(e.kind, e.session_id) for e in lost.events]
    degraded = [e for e in lost.events if e.kind == "degraded" and e.session_id == "a"]
    assert degraded and degraded[0].data["what"] == "pipeline"
    assert degraded[0].data["reason"] == "stage 1 (Ray actor) died"
    order = [kinds.index(k) for k in [("degraded", "a"), ("pipeline_rebuilt", ""), ("recovered", "a")]]
    assert order == sorted(order)
    assert ("failed", "a") not in kinds and lost.sessions["a"].state == "active"
    assert lost.sessions["c"].state == "failed"
    assert "pipeline_failed: stage 1 (Ray actor) died" in str(lost.sessions["c"].error)
    assert executors[0].rebuilds == 1 and rs.pipeline_failures == 1 and not lost.rebuilding
    # The other replica never noticed; both run their sessions to the end.
    assert kept.sessions["b"].state == "active" and executors[1].rebuilds == 0
    end = clock.now() + 6.0
    lost.run_until(end)
    kept.run_until(end + 6.0)
    assert lost.sessions["a"].state == kept.sessions["b"].state == "finished"
    frames_a = sum(e.data["num_frames"] for e in lost.events
                   if e.kind == "frames_ready" and e.session_id == "a")
    assert frames_a >= 12  # 3 s at 4 fps: every block, none lost to the failure


def test_a_failed_rebuild_ends_the_sessions_and_is_retried() -> None:
    rs, executors, clock = replicas(1)
    rs.open_session(request("a", duration=3.0))
    engine = rs.engines[0]
    attempts = []

    def broken() -> list[str]:
        attempts.append(clock.now())
        raise RuntimeError("no GPU left in the placement group")

    executors[0].rebuild = broken  # type: ignore[method-assign]
    engine.tick()
    executors[0].lose_pipeline = "stage 0 died"
    engine.tick()
    engine.tick()
    assert engine.sessions["a"].state == "failed" and "rebuild failed" in str(engine.sessions["a"].error)
    assert engine.rebuilding and not engine.tick()  # retried at most once a second
    clock.advance_to(clock.now() + 1.5)
    engine.tick()
    assert len(attempts) == 2
    decision = rs.open_session(request("b"))
    assert decision.outcome == "rejected" and "rebuilt" in str(decision.detail)


def test_a_rebuilding_replica_takes_no_new_sessions() -> None:
    rs, _, _ = replicas(2)
    rs.engines[0].rebuilding = True
    rs.open_session(request("a"))
    rs.open_session(request("b"))
    assert rs.replica_of("a") == rs.replica_of("b") == 1
