"""`rollcast bench`: the engine's offline speed on this machine (no server, no network).

Flags are checked before the model loads; a bad one exits with code 2 and one line naming it.
The report (JSON, `loadgen/engine_bench.py` documents every key) goes to `--json`; stdout gets a
short human summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rollcast.loadgen.engine_bench import MODES, BenchConfig, format_summary, run_bench
from rollcast.pipeline_parallel.stage_group import EXECUTORS
from rollcast.server.cli_args import non_negative_int, positive_int, worker_spec
from rollcast.workers.vae import VAE_KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps per block (default: all the sampler's trained steps)")
    p.add_argument("--batch", type=positive_int, default=1, help="sessions run together in every forward")
    p.add_argument("--stages", type=positive_int, default=1,
                   help="split the layers into this many contiguous stages and time each")
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="run the stages for real: local (threads) or mp (one process each); default: "
                        "one device, stage times cut from one forward")
    p.add_argument("--vae", choices=VAE_KINDS, default=None, help="default: the model config's")
    p.add_argument("--mode", choices=MODES, default="t2v", help="v2v adds each block's input encode")
    p.add_argument("--iters", type=positive_int, default=5, help="measured blocks")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="blocks run before measuring (default: enough to fill the KV cache's sink + window)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: the GPU's spec sheet, else a measured matmul)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")


def run(args: argparse.Namespace) -> int:
    config = BenchConfig(
        worker=worker_spec(args, v2v=args.mode == "v2v"), vae=args.vae, mode=args.mode, steps=args.steps,
        batch=args.batch, stages=args.stages, executor=args.executor, iters=args.iters, warmup=args.warmup,
        peak_tflops=args.peak_tflops, seed=args.seed,
    )
    config.validate()
    if args.json is not None and not args.json.parent.is_dir():
        raise ValueError(f"--json {args.json}: the directory {args.json.parent} does not exist")
    report = run_bench(config)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_summary(report), flush=True)
    return 0
