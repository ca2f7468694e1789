"""The `rollcast` command line. Each subcommand composes the packages' own config objects."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rollcast import __version__
from rollcast.server import (
    cli_bench,
    cli_eval_tiny,
    cli_generate,
    cli_loadgen,
    cli_partition,
    cli_serve,
    cli_simulate,
    cli_train_tiny,
)
from rollcast.server.cli_args import add_model_args, positive_int, worker_spec
from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.checkpoint import (
    WRITE_FORMATS,
    CheckpointError,
    check_state_dict,
    infer_config,
    read_state_dict,
    synthetic_model,
    write_checkpoint,
)
from rollcast.workers.checkpoint_keys import is_diffusers_layout, to_wan_layout
from rollcast.workers.model_config import PRESETS, ModelConfig
from rollcast.workers.model_files import write_model_dir
from rollcast.workers.stream_generator import (
    DTYPES,
    build_runner,
    parse_dtype,
)


def cmd_model(args: argparse.Namespace) -> int:
    """Build the model and stream latent blocks of one session through the rolling cache."""
    spec = worker_spec(args)
    runner = build_runner(spec)
    cfg = spec.config
    g = torch.Generator().manual_seed(args.seed)
    # A stand-in text embedding: prompts become real with the text encoder.
    prompt = runner.model.prompt_kv(torch.randn(16, cfg.text_dim, generator=g).to(spec.device))
    state = runner.open("cli", prompt, seed=args.seed, num_steps=args.steps)
    params = sum(p.numel() for p in runner.model.parameters())
    print(json.dumps({"config": cfg.name, "params": params, "policy": spec.policy.name,
                      "resolution": list(spec.resolution), "latent_hw": list(runner.latent_hw),
                      "frames_per_block": runner.frames_per_block, "timesteps": state.timesteps,
                      "kv_cache_bytes": runner.pool.nbytes, "device": spec.device,
                      "dtype": str(spec.dtype).removeprefix("torch.")}), flush=True)
    for block in range(args.blocks):
        t0 = time.perf_counter()
        out = None
        forwards = 0
        while out is None:
            (out,) = runner.run([state])
            forwards += 1
        if spec.policy.context_pass:
            runner.run([state])
            forwards += 1
        if spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(json.dumps({"block": block, "frames_done": state.frames_done, "forwards": forwards,
                          "seconds": round(dt, 4), "latent_std": round(out.std().item(), 4)}),
              flush=True)
    runner.close(state)
    return 0


def cmd_checkpoint_synth(args: argparse.Namespace) -> int:
    cfg = ModelConfig.preset(args.config)
    if args.model_dir:
        files = write_model_dir(cfg, args.output, seed=args.seed, dtype=parse_dtype(args.dtype, "cpu"),
                                dit_format=args.format)
        print(json.dumps({"written": str(files.root), "config": cfg.name, "dit": files.dit.name,
                          "tokenizer": bool(files.tokenizer)}))
        return 0
    model = synthetic_model(cfg, seed=args.seed, dtype=parse_dtype(args.dtype, "cpu"))
    path = write_checkpoint(model.state_dict(), args.output, args.format, config=cfg)
    print(json.dumps({"written": str(path), "config": cfg.name, "format": args.format}))
    return 0


def cmd_checkpoint_inspect(args: argparse.Namespace) -> int:
    raw = read_state_dict(args.path)
    cfg = ModelConfig.preset(args.config) if args.config else infer_config(args.path)
    sd = to_wan_layout(raw)
    with torch.device("meta"):
        check_state_dict(CausalWanModel(cfg), sd)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in raw.values()})
    print(json.dumps({"path": str(args.path), "config": cfg.name, "tensors": len(raw),
                      "params": sum(v.numel() for v in raw.values()), "dtypes": dtypes,
                      "layout": "diffusers" if is_diffusers_layout(raw) else "wan", "fits": True}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollcast", description="SLO-aware serving of streaming video diffusion")
    parser.add_argument("--version", action="version", version=f"rollcast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model", help="build the DiT and stream latent blocks through the rolling KV cache")
    add_model_args(p, checkpoint_help="DiT checkpoint file or directory (random weights if absent)")
    p.add_argument("--blocks", type=positive_int, default=4, help="blocks to generate")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (1-4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("generate", help="generate a video file from a prompt (or restyle an input video)")
    add_model_args(p, checkpoint_help="model directory with the published file names (DiT, "
                   "Wan2.1_VAE.pth / taew2_1, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/); "
                   "default: the shipped tiny model, random weights for other presets")
    cli_generate.add_arguments(p)
    p.set_defaults(func=cli_generate.run)

    p = sub.add_parser("serve", help="serve live streams: REST, WebRTC, WebSocket, the web page, metrics")
    cli_serve.add_arguments(p)
    p.set_defaults(func=cli_serve.run)

    p = sub.add_parser("simulate", help="run the engine and scheduler on a fake clock with a cost model")
    cli_simulate.add_arguments(p)
    p.set_defaults(func=cli_simulate.run)

    p = sub.add_parser("bench", help="measure the engine offline: fps, block and component times, MFU")
    add_model_args(p, checkpoint_help="model directory (as for generate); random weights if absent")
    cli_bench.add_arguments(p)
    p.set_defaults(func=cli_bench.run)

    p = sub.add_parser("train-tiny", help="train the tiny default model on the shapes dataset (CPU)")
    cli_train_tiny.add_arguments(p)
    p.set_defaults(func=cli_train_tiny.run)

    p = sub.add_parser("eval-tiny", help="score generated shapes videos with the colour/centroid detector")
    cli_eval_tiny.add_arguments(p)
    p.set_defaults(func=cli_eval_tiny.run)

    p = sub.add_parser("partition", help=cli_partition.HELP)
    cli_partition.add_arguments(p)
    p.set_defaults(func=cli_partition.run)

    p = sub.add_parser("loadgen", help="load a running server with real clients: TTFF, jitter, SLO "
                                       "attainment")
    cli_loadgen.add_arguments(p)
    p.set_defaults(func=cli_loadgen.run)

    ck = sub.add_parser("checkpoint", help="write or check DiT checkpoints")
    cks = ck.add_subparsers(dest="checkpoint_command", required=True)
    p = cks.add_parser("synth", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("output", type=Path)
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--format", default="safetensors", choices=WRITE_FORMATS)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", action="store_true",
                   help="write a whole model directory (DiT, both VAEs, text encoder, tokenizer) "
                        "under the published file names")
    p.set_defaults(func=cmd_checkpoint_synth)
    p = cks.add_parser("inspect", help="read a checkpoint and check it fits a config")
    p.add_argument("path", type=Path)
    p.add_argument("--config", choices=sorted(PRESETS), help="default: config.json or matching preset")
    p.set_defaults(func=cmd_checkpoint_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (CheckpointError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"rollcast: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
