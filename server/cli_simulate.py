"""`rollcast simulate`: the real engine and scheduler on a fake clock, with a simulated executor
that takes the cost model's time. One rate, or a sweep of rates with the goodput it reaches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rollcast.scheduler.admission import AdmissionConfig
from rollcast.scheduler.cost_model import COST_PRESETS, resolve
from rollcast.scheduler.engine import EngineConfig
from rollcast.scheduler.policies import POLICY_NAMES
from rollcast.scheduler.simulator import SimGeometry, Workload, simulate, sweep, with_tiny_vae


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="slo", choices=POLICY_NAMES)
    p.add_argument("--cost-model", default="h100-wan-1.3b-480p",
                   help=f"a preset ({', '.join(sorted(COST_PRESETS))}) or a cost-model JSON file")
    p.add_argument("--vae", choices=("wan", "tiny"), default="wan",
                   help="codec cost: the preset's Wan VAE, or TAEHV scaled by FLOPs")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--rate", type=float, default=0.2, help="session arrivals per second")
    p.add_argument("--rates", help="comma-separated rates: sweep them and report the goodput")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma: CV of inter-arrival times")
    p.add_argument("--session-seconds", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--mode", choices=("t2v", "v2v"), default="t2v")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=1, help="degradation floor (0: no degradation)")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--ttff-ms", type=float, default=1000.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-utilization", type=float, default=0.95)
    p.add_argument("--jitter", type=float, default=0.05, help="log-normal sigma of batch times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")


def run(args: argparse.Namespace) -> int:
    cost = resolve(args.cost_model)
    if args.vae == "tiny":
        cost = with_tiny_vae(cost)
    workload = Workload(
        rate=args.rate, duration_s=args.duration, session_seconds=args.session_seconds,
        arrival=args.arrival, burstiness=args.burstiness, mode=args.mode, steps=args.steps,
        min_steps=args.min_steps or None, fps=args.fps, ttff_s=args.ttff_ms / 1000, seed=args.seed,
    )
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    config = EngineConfig(max_batch=args.max_batch,
                          admission=AdmissionConfig(max_utilization=args.max_utilization))
    geometry = SimGeometry.for_preset(args.cost_model)
    if args.rates:
        try:
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--rates must be comma-separated numbers, got {args.rates!r}") from None
        result = sweep(args.policy, cost, rates, workload, geometry=geometry, config=config,
                       jitter=args.jitter)
        attainment = {r["workload"]["rate"]: round(r["slo_attainment"], 4) for r in result["runs"]}
        summary = {"policy": args.policy, "goodput_rate_at_99": result["goodput_rate_at_99"],
                   "attainment": attainment}
    else:
        result = simulate(args.policy, cost, workload, geometry=geometry, config=config, jitter=args.jitter)
        summary = {k: result[k] for k in ("policy", "sessions", "admitted", "queued", "rejected",
                                          "slo_attainment", "goodput_sessions_per_s", "p50_ttff_ms",
                                          "p99_ttff_ms", "deadline_miss_rate", "mean_batch_size")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary), file=sys.stdout)
    return 0
