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
                   help="run the stages for real: local (threads), mp (one process each) or ray (one "
                        "actor each); default: one device, stage times cut from one forward")
    p.add_argument("--vae", choices=VAE_KINDS, default=None, help="default: the model config's")
    p.add_argument("--mode", choices=MODES, default="t2v", help="v2v adds each block's input encode")
    p.add_argument("--iters", type=positive_int, default=5, help="measured blocks")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="blocks run before measuring (default: enough to fill the KV cache's sink + window)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: the GPU's spec sheet, else a measured matmul)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--kernels", action="store_true",
                   help="instead: time each Triton kernel against its eager and torch.compile'd "
                        "reference at the model's shapes (needs CUDA); decides kernels.dispatch.GPU_ENABLED")


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return _run_kernels(args)
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


def _run_kernels(args: argparse.Namespace) -> int:
    import math

    import torch

    from rollcast.kernels.microbench import BenchShape, bench_kernels

    if not torch.cuda.is_available():
        raise ValueError("--kernels needs a CUDA device (the Triton interpreter's timings mean nothing)")
    worker = worker_spec(args)
    cfg = worker.config
    lh, lw = cfg.latent_hw(*worker.resolution)
    shape = BenchShape(batch=args.batch, frames=cfg.frames_per_block,
                       tokens_per_frame=cfg.tokens_per_frame(lh, lw), num_heads=cfg.num_heads,
                       head_dim=cfg.head_dim, sink=worker.policy.sink_frames,
                       window=worker.policy.window_frames)
    results = bench_kernels(shape, dtype=worker.dtype, iters=args.iters * 10)
    kernels = {k: {m: (None if math.isnan(v) else v) for m, v in r.items()} for k, r in results.items()}
    report = {"shape": shape.__dict__, "dtype": str(worker.dtype), "device": torch.cuda.get_device_name(),
              "kernels": kernels}  # JSON has no NaN: a reference that did not compile is null
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:>16}: triton {r['triton_ms']:.3f} ms, eager {r['eager_ms']:.3f} ms "
              f"(x{r['speedup_vs_eager']:.2f}), compiled {r['compiled_ms']:.3f} ms", flush=True)
    return 0
