"""Command-line options shared by the subcommands that build a model, and the WorkerSpec they make."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from rollcast.pipeline_parallel.parallel_config import ParallelConfig, parse_ranges
from rollcast.pipeline_parallel.stage_group import EXECUTORS
from rollcast.workers.cache_policy import POLICIES, CachePolicy
from rollcast.workers.checkpoint import infer_config
from rollcast.workers.model_config import PRESETS, ModelConfig
from rollcast.workers.model_files import ModelFiles
from rollcast.workers.sampler import SAMPLERS, SamplerConfig
from rollcast.workers.stream_generator import (
    DTYPES,
    KV_DTYPES,
    WorkerSpec,
    best_device,
    parse_dtype,
    parse_resolution,
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser, *, checkpoint_help: str) -> None:
    p.add_argument("--config", default=None, choices=sorted(PRESETS),
                   help="model preset (default: the checkpoint's config.json, else tiny)")
    p.add_argument("--checkpoint", type=Path, help=checkpoint_help)
    p.add_argument("--lora", type=Path, help="LoRA (PEFT state dict) to merge into the checkpoint")
    p.add_argument("--policy", default=None, choices=sorted(POLICIES),
                   help="KV cache policy (default: the model's, longlive for tiny, else self-forcing)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="sampler preset (default: the policy's family)")
    p.add_argument("--rope", choices=("baked", "late"), help="override the policy's RoPE mode")
    p.add_argument("--resolution", help="WIDTHxHEIGHT in pixels (default: the model's)")
    p.add_argument("--frames-per-block", type=positive_int, help="latent frames per block")
    p.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                   help="KV cache storage: bf16 = the model's dtype (default), fp8 = e4m3 with per-token "
                        "scales, about half the cache memory (docs/benchmarking.md: its error)")


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    """For commands that build a whole pipeline: the `tiny` preset loads its shipped trained model
    when no checkpoint is given; this keeps seeded random weights instead (tests, benchmarks)."""
    p.add_argument("--random-weights", action="store_true",
                   help="without --checkpoint: seeded random weights instead of the shipped tiny model")


def random_weights(args: argparse.Namespace) -> bool:
    """`--random-weights`, refused beside `--checkpoint` (it would be silently ignored)."""
    if args.random_weights and args.checkpoint is not None:
        raise ValueError("--random-weights and --checkpoint exclude each other")
    return bool(args.random_weights)


def _default_sampler(policy: str, v2v: bool) -> str:
    if policy == "streamdiffusionv2":
        return "streamdiffusionv2-v2v" if v2v else "streamdiffusionv2"
    return "self-forcing"


def worker_spec(args: argparse.Namespace, *, v2v: bool = False) -> WorkerSpec:
    if args.config is None:
        cfg = (infer_config(ModelFiles.resolve(args.checkpoint).dit) if args.checkpoint
               else ModelConfig.preset("tiny"))
    else:
        cfg = ModelConfig.preset(args.config)
    policy_name = args.policy or cfg.default_policy
    policy = CachePolicy.preset(policy_name)
    if args.rope:
        policy = policy.replace(rope=args.rope)
    sampler = SamplerConfig.preset(args.sampler or _default_sampler(policy_name, v2v))
    device = args.device or best_device()
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is available")
    fpb = args.frames_per_block or (1 if policy_name == "streamdiffusionv2" else None)
    return WorkerSpec(
        config=cfg, policy=policy, sampler=sampler,
        resolution=parse_resolution(args.resolution) if args.resolution else cfg.default_resolution,
        max_sessions=1, device=device, dtype=parse_dtype(args.dtype, device),
        checkpoint=args.checkpoint, lora=args.lora, frames_per_block=fpb, kv_dtype=args.kv_dtype,
    )


def add_parallel_args(p: argparse.ArgumentParser, *, stages: bool = True) -> None:
    """--stages / --executor / --layer-ranges: how the DiT's layers are split into pipeline stages."""
    if stages:
        p.add_argument("--stages", type=positive_int, default=1,
                       help="pipeline stages the DiT's layers are split into (default 1)")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="where the stages run: local (threads of this process), mp (one process "
                        "per stage, torch.distributed: gloo on CPU, NCCL on GPUs) or ray (one Ray "
                        "actor per stage, a placement group per pipeline)")
    p.add_argument("--address", default=None, metavar="auto|ray://HOST:PORT",
                   help="with --executor ray: the Ray cluster to join ('auto': the one this node "
                        "belongs to); default: start a local Ray instance")
    p.add_argument("--ray-resources", default=None, metavar="gpu_h100,gpu_h100,gpu_l40s",
                   help="with --executor ray: per pipeline rank (stages, then the decode stage), a "
                        "custom Ray resource its actor needs, to pin stages to GPU groups")
    p.add_argument("--layer-ranges", default=None, metavar="0-9,10-29",
                   help="first-last layer of each stage (default: an even split; the block "
                        "scheduler rebalances online)")
    p.add_argument("--no-rebalance", action="store_true",
                   help="keep the layer ranges fixed (no online rebalancing from measured stage times)")
    p.add_argument("--vae-stage", action="store_true",
                   help="decode finished blocks on a stage of their own after the last DiT stage "
                        "(its own process/GPU) instead of on the last stage")


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    ranges = parse_ranges(args.layer_ranges) if args.layer_ranges else None
    stages = args.stages if ranges is None or args.stages != 1 else len(ranges)
    return ParallelConfig(stages=stages, executor=args.executor, layer_ranges=ranges,
                          rebalance=not args.no_rebalance, decode_stage=args.vae_stage,
                          ray_address=args.address,
                          ray_resources=tuple(args.ray_resources.split(",")) if args.ray_resources else ())
