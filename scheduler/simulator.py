"""The discrete-event simulator: the real engine, policy and admission on a fake clock, with an
executor that takes the cost model's time. Same seed, same run, bit for bit.

A workload is an arrival process (Poisson, or gamma with a burstiness factor) of sessions that
each stream for `session_seconds`. A session meets its SLO when it was admitted, streamed to the
end, its first frames came within its TTFF SLO of its *request* (admission wait included) and at
most `max_miss_rate` of its chunks were late. Attainment is the share of all requests that met
their SLO; goodput (per run) is SLO-meeting sessions per second of arrivals, and over a sweep of
rates the highest rate whose attainment is at least 99 %.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from rollcast.scheduler.arrivals import arrival_times
from rollcast.scheduler.clock import FakeClock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.engine import Engine, EngineConfig
from rollcast.scheduler.executor import SimulatedExecutor
from rollcast.scheduler.policies import make_policy
from rollcast.scheduler.session import BlockGeometry, SessionRecord, SessionRequest, SessionSLO
from rollcast.scheduler.work import ForwardShape


@dataclass(frozen=True)
class Workload:
    rate: float  # sessions per second
    duration_s: float = 120.0  # arrivals stop after this
    session_seconds: float = 20.0
    arrival: Literal["poisson", "gamma"] = "poisson"
    burstiness: float = 1.0  # gamma: coefficient of variation of inter-arrival times
    mode: Literal["t2v", "v2v"] = "t2v"
    steps: int = 2
    min_steps: int | None = 1  # sessions accept degradation down to this (None: never)
    fps: float = 16.0
    ttff_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.session_seconds <= 0:
            raise ValueError("rate, duration and session seconds must be positive")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")


# TAEHV's FLOPs relative to the Wan VAE's (reference/performance.md 2.6): decode, encode.
TINY_VAE_CODEC_RATIO = (0.54 / 13.55, 0.46 / 8.05)


def with_tiny_vae(cost: CostModel) -> CostModel:
    """The same hardware and DiT with TAEHV as the codec (its cost scaled from the Wan VAE's by FLOPs)."""
    out = copy.deepcopy(cost)
    out.name = f"{cost.name}+taehv"
    out.decode_s_per_latent_frame *= TINY_VAE_CODEC_RATIO[0]
    out.encode_s_per_latent_frame *= TINY_VAE_CODEC_RATIO[1]
    return out


@dataclass(frozen=True)
class SimGeometry:
    """The forward shape of the simulated model (must match the cost model's setup)."""

    latent_frames: int = 1
    tokens_per_frame: int = 1560
    kv_frames: int = 6
    resolution: tuple[int, int] = (832, 480)
    context_pass: bool = False

    def block(self) -> BlockGeometry:
        shape = ForwardShape(self.latent_frames, self.tokens_per_frame, self.kv_frames, self.resolution)
        return BlockGeometry(shape, self.context_pass)

    @classmethod
    def for_preset(cls, name: str) -> SimGeometry:
        """StreamDiffusionV2's v2v setup (1-frame blocks, 6-frame KV) at the preset's resolution."""
        if "512" in name:
            return cls(tokens_per_frame=1024, resolution=(512, 512))
        return cls()


def workload_arrivals(w: Workload) -> list[float]:
    return arrival_times(w.rate, w.duration_s, arrival=w.arrival, burstiness=w.burstiness, seed=w.seed)


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def session_summary(rec: SessionRecord) -> dict[str, Any]:
    st = rec.stats
    ttff = None if st.t_first_frame is None else st.t_first_frame - rec.t_arrival
    miss = st.late_chunks / st.chunks if st.chunks else None
    completed = rec.state == "finished" and rec.done
    met = (completed and ttff is not None and ttff <= rec.slo.ttff_s
           and (miss or 0.0) <= rec.slo.max_miss_rate)
    return {
        "session_id": rec.session_id, "state": rec.state, "arrival_s": rec.t_arrival,
        "admission_wait_s": None if rec.t_admitted is None else rec.t_admitted - rec.t_arrival,
        "ttff_s": ttff, "chunks": st.chunks, "late_chunks": st.late_chunks, "miss_rate": miss,
        "max_lateness_s": st.max_lateness_s, "frames": st.frames, "final_steps": rec.steps,
        "final_fps": rec.fps, "mean_batch": statistics.fmean(st.batch_sizes) if st.batch_sizes else None,
        "slo_met": bool(met),
    }


def simulate(policy_name: str, cost: CostModel, workload: Workload, *,
             geometry: SimGeometry | None = None, config: EngineConfig | None = None,
             jitter: float = 0.05, drain_s: float = 60.0) -> dict[str, Any]:
    """One run; returns the report (JSON-ready)."""
    geo = (geometry or SimGeometry()).block()
    clock = FakeClock()
    truth = copy.deepcopy(cost)  # the executor's "hardware"; the engine's copy learns online
    executor = SimulatedExecutor(clock, truth, jitter=jitter, seed=workload.seed + 1)
    engine = Engine(executor, copy.deepcopy(cost), make_policy(policy_name), clock=clock,
                    geometry=lambda _req: geo, config=config)
    pending = workload_arrivals(workload)
    slo = SessionSLO(ttff_s=workload.ttff_s, fps=workload.fps, min_steps=workload.min_steps)
    counter = iter(range(len(pending)))

    def arrivals(now: float) -> float | None:
        while pending and pending[0] <= now:
            pending.pop(0)
            i = next(counter)
            engine.open_session(SessionRequest(f"s{i:05d}", mode=workload.mode, seed=i, steps=workload.steps,
                                               slo=slo, duration_s=workload.session_seconds))
        return pending[0] if pending else None

    end = workload.duration_s + workload.session_seconds + drain_s
    _run(engine, clock, end, arrivals)
    return report(engine, policy_name, workload, cost)


def _run(engine: Engine, clock: FakeClock, end: float, arrivals: Callable[[float], float | None]) -> None:
    # Stop early once arrivals are over and every session has ended.
    while clock.now() < end:
        nxt = arrivals(clock.now())
        if nxt is None and not engine.active and not engine.queue:
            return
        engine.run_until(min(end, nxt if nxt is not None else end), arrivals=None)


def report(engine: Engine, policy: str, w: Workload, cost: CostModel) -> dict[str, Any]:
    sessions = [session_summary(r) for r in engine.sessions.values()]
    n = len(sessions)
    ttffs = [s["ttff_s"] for s in sessions if s["ttff_s"] is not None]
    chunks = sum(s["chunks"] for s in sessions)
    late = sum(s["late_chunks"] for s in sessions)
    kinds = [e.kind for e in engine.events]
    rejected = [e for e in engine.events if e.kind == "rejected"]
    met = sum(s["slo_met"] for s in sessions)
    return {
        "policy": policy, "cost_model": cost.name, "workload": asdict(w),
        "sessions": n,
        "admitted": sum(s["admission_wait_s"] is not None for s in sessions),
        "queued": kinds.count("queued"),
        "rejected": len(rejected),
        "rejected_by_reason": {r: sum(e.data.get("reason") == r for e in rejected)
                               for r in ("capacity_exhausted", "slo_infeasible")},
        "slo_attainment": met / n if n else 1.0,
        "goodput_sessions_per_s": met / w.duration_s,
        "p50_ttff_ms": None if not ttffs else 1000 * _pct(ttffs, 50),  # type: ignore[operator]
        "p99_ttff_ms": None if not ttffs else 1000 * _pct(ttffs, 99),  # type: ignore[operator]
        "deadline_miss_rate": late / chunks if chunks else 0.0,
        "chunks": chunks,
        "mean_batch_size": engine.batched_items / engine.batches if engine.batches else 0.0,
        "degradations": kinds.count("degraded"),
        "recoveries": kinds.count("recovered"),
        "simulated_seconds": engine.clock.now(),
        "per_session": sessions,
    }


def sweep(policy: str, cost: CostModel, rates: Sequence[float], base: Workload, **kw: Any) -> dict[str, Any]:
    runs = []
    for r in rates:
        w = Workload(**{**asdict(base), "rate": r})
        rep = simulate(policy, cost, w, **kw)
        rep.pop("per_session")
        runs.append(rep)
    goodput = 0.0
    for r in sorted(runs, key=lambda r: r["workload"]["rate"]):  # up to the first rate that fails
        if r["slo_attainment"] < 0.99:
            break
        goodput = r["workload"]["rate"]
    return {"policy": policy, "cost_model": cost.name, "runs": runs, "goodput_rate_at_99": goodput}
