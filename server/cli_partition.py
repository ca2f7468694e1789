"""`rollcast partition`: the block scheduler's plan for a layer profile, or the FPS projection.

A profile comes from a file (`--profile`, written by `--save-profile`) or is measured here
(`--measure`); the plan splits its layers over `--stages` equal devices or one stage per
`--speeds` entry, within `--memory-gb` per stage. `--project` prints projected StreamDiffusionV2
FPS versus GPU count from the H100 cost-model presets instead. Bad input raises ValueError, which
`rollcast` turns into exit code 2 and one `rollcast: error: ...` line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rollcast.pipeline_parallel.layer_profile import LayerProfile, devices_for, measure_layer_profile
from rollcast.pipeline_parallel.partition import PartitionPlan, evaluate_ranges, even_ranges, plan_partition
from rollcast.pipeline_parallel.projection import format_projection, projection_table
from rollcast.server.cli_args import positive_float, positive_int
from rollcast.workers.model_config import PRESETS, ModelConfig
from rollcast.workers.stream_generator import DTYPES, best_device, parse_dtype, parse_resolution

HELP = "plan the pipeline stages' layer ranges from a layer profile, or project FPS vs GPU count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--profile", type=Path, help="a layer profile JSON (see --save-profile)")
    source.add_argument("--measure", action="store_true", help="measure a profile on this machine")
    source.add_argument("--project", action="store_true",
                        help="print projected FPS vs GPU count (H100 cost-model presets)")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="--measure: model preset")
    p.add_argument("--resolution", help="--measure: WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--batch", type=positive_int, default=1, help="--measure: stream-batch rows per forward")
    p.add_argument("--device", default=None, help="--measure: cpu or cuda (default: best available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="--measure: default bf16 on cuda")
    p.add_argument("--kv-frames", type=positive_int, default=None,
                   help="--measure: latent frames of K/V attended (default: the self-forcing cache's)")
    p.add_argument("--repeats", type=positive_int, default=3, help="--measure: timed runs per piece")
    p.add_argument("--save-profile", type=Path, help="--measure: write the measured profile here")
    stages = p.add_mutually_exclusive_group()
    stages.add_argument("--stages", type=positive_int, default=None, help="equal devices (default 2)")
    stages.add_argument("--speeds", help="relative speed per stage, e.g. 1,1,0.5 (sets the stage count)")
    p.add_argument("--memory-gb", help="memory per stage for its layers in GB (1e9 bytes), e.g. 80,80,40")
    p.add_argument("--gpus", type=positive_int, default=4, help="--project: up to this many GPUs")
    p.add_argument("--steps", default="1,4", help="--project: denoising steps, comma-separated")
    p.add_argument("--link-latency-us", type=positive_float, default=20.0,
                   help="--project: per-hop latency in microseconds (NVLink NCCL p2p ~20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.project:
        return _run_projection(args)
    if args.profile is None and not args.measure:
        raise ValueError("give --profile FILE, --measure or --project")
    profile = LayerProfile.load(args.profile) if args.profile is not None else _measure(args)
    if args.save_profile is not None:
        profile.save(args.save_profile)
    speeds = _numbers(args.speeds, "--speeds") if args.speeds else [1.0] * (args.stages or 2)
    memory = ([int(gb * 1e9) for gb in _numbers(args.memory_gb, "--memory-gb")] if args.memory_gb
              else [None] * len(speeds))
    if len(memory) != len(speeds):
        raise ValueError(f"--memory-gb has {len(memory)} values for {len(speeds)} stages")
    devices = devices_for(profile, speeds, memory)
    plan = plan_partition(profile.layers, devices)
    even = evaluate_ranges(even_ranges(len(profile.layers), len(devices)), profile.layers, devices)
    if args.json:
        print(json.dumps({"profile": _describe(profile), "plan": plan.to_dict(), "even": even.to_dict()}))
    else:
        print(_format(profile, plan, even))
    return 0


def _measure(args: argparse.Namespace) -> LayerProfile:
    config = ModelConfig.preset(args.config)
    device = args.device or best_device()
    resolution = parse_resolution(args.resolution) if args.resolution else config.default_resolution
    return measure_layer_profile(config, resolution, batch=args.batch, device=device,
                                 dtype=parse_dtype(args.dtype, device), repeats=args.repeats,
                                 kv_frames=args.kv_frames)


def _run_projection(args: argparse.Namespace) -> int:
    steps = [int(s) for s in _numbers(args.steps, "--steps")]
    if any(s not in (1, 2, 3, 4) for s in steps):
        raise ValueError(f"--steps must be among 1..4 (the presets' range), got {args.steps!r}")
    rows = projection_table(gpus=range(1, args.gpus + 1), steps=steps,
                            link_latency_s=args.link_latency_us * 1e-6)
    print(json.dumps(rows) if args.json else format_projection(rows))
    return 0


def _numbers(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{option} values must be positive, got {text!r}")
    return values


def _describe(profile: LayerProfile) -> dict[str, Any]:
    data = profile.to_dict()
    data.pop("layers")
    data["num_layers"] = len(profile.layers)
    data["layer_s_total"] = sum(c.time_s for c in profile.layers)
    return data


def _format(profile: LayerProfile, plan: PartitionPlan, even: PartitionPlan) -> str:
    w, h = profile.resolution
    total = sum(c.time_s for c in profile.layers)
    slower = even.bottleneck_s / plan.bottleneck_s - 1 if plan.bottleneck_s > 0 else 0.0
    return "\n".join([
        f"profile: {profile.config} {w}x{h}, batch {profile.batch}, {profile.device} {profile.dtype}, "
        f"KV {profile.kv_frames} frames: {len(profile.layers)} layers, {total:.6f} s in all, "
        f"embed {profile.first_s:.6f} s, head {profile.last_s:.6f} s",
        plan.format(),
        f"even split (StreamDiffusionV2 default) {[len(r) for r in even.ranges]}: bottleneck "
        f"{even.bottleneck_s:.6f} s ({slower:+.1%})",
    ])
