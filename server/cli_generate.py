"""`rollcast generate`: a prompt (or an input video) to a video file, one session, no server.

Everything that can be checked cheaply (output type and directory, input video, resolution, frame
count, checkpoint directory) is checked before the model loads; any failure exits with code 2 and
one line naming the problem, and nothing is left at the output path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rollcast.server.cli_args import (
    add_parallel_args,
    add_weights_arg,
    parallel_config,
    random_weights,
    worker_spec,
)
from rollcast.workers.noise_controller import NoiseControllerConfig
from rollcast.workers.vae import VAE_KINDS
from rollcast.workers.video_file import VideoFileWriter, check_output_path, read_video
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate

DEFAULT_T2V_FRAMES = 33  # 1 + 4·8: three 3-frame blocks (9 + 12 + 12 frames)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weights_arg(p)
    p.add_argument("--prompt", required=True, help="what to generate (or how to restyle the input)")
    p.add_argument("--input", type=Path, help="input video (any FFmpeg-readable file, or .npy uint8 "
                   "[T, H, W, 3]) for video-to-video")
    p.add_argument("--frames", type=int, default=None,
                   help=f"frames to write (text-to-video default {DEFAULT_T2V_FRAMES}; video-to-video "
                        "default: all input frames)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (1-4; default: all trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, required=True, help="OUT.mp4 (H.264) or OUT.npy (uint8)")
    p.add_argument("--vae", choices=VAE_KINDS, default=None, help="default: the model config's")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="v2v: initial noise scale of the motion-aware controller (default 0.8)")
    p.add_argument("--fixed-noise", action="store_true",
                   help="v2v: keep the noise scale fixed instead of adapting it to motion")
    p.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="change the prompt at this output frame (from the first block starting at or "
                        "after it); repeatable")
    p.add_argument("--transition-blocks", type=int, default=0,
                   help="blend into each switched prompt over this many blocks (default: at once)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_parallel_args(p)


def _check_frames(n: int | None) -> None:
    if n is not None and n <= 0:
        raise ValueError(f"--frames must be a positive number of frames, got {n}")


def parse_switches(items: list[str]) -> list[tuple[int, str]]:
    out = []
    for item in items:
        frame, sep, prompt = item.partition(":")
        if not sep or not frame.strip().isdigit():
            raise ValueError(f"--switch must look like FRAME:PROMPT with FRAME >= 0, got {item!r}")
        out.append((int(frame), prompt))
    return out


def run(args: argparse.Namespace) -> int:
    _check_frames(args.frames)
    out = check_output_path(args.output)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    switches = parse_switches(args.switch)
    if args.transition_blocks < 0:
        raise ValueError(f"--transition-blocks must be >= 0, got {args.transition_blocks}")
    v2v = args.input is not None
    synthetic = random_weights(args)  # before worker_spec reads the checkpoint
    worker = worker_spec(args, v2v=v2v)
    cfg = worker.config
    cfg.latent_hw(*worker.resolution)  # an unsupported resolution fails here, before loading
    input_frames = None
    if v2v:
        input_frames = read_video(args.input, resolution=worker.resolution, fps=cfg.fps,
                                  max_frames=args.frames)
    frames = args.frames or (len(input_frames) if input_frames is not None else DEFAULT_T2V_FRAMES)
    noise = NoiseControllerConfig(
        init_scale=args.noise_scale if args.noise_scale is not None else 0.8,
        adaptive=not args.fixed_noise,
    )
    t0 = time.perf_counter()
    parallel = parallel_config(args)
    parallel.ranges(cfg.num_layers)  # a bad split fails before anything loads
    pipeline = VideoPipeline.build(PipelineSpec(worker=worker, vae=args.vae, noise=noise,
                                                synthetic_weights=synthetic),
                                   parallel.build_runner)
    load_s = time.perf_counter() - t0
    width, height = pipeline.resolution
    bar = tqdm(total=frames, unit="frame", file=sys.stderr, disable=args.no_progress,
               desc=out.name, dynamic_ncols=True)
    t1 = time.perf_counter()
    with VideoFileWriter(out, width=width, height=height, fps=pipeline.fps, frames=frames) as writer:
        def emit(chunk: np.ndarray) -> None:
            writer.write(chunk)
            bar.update(len(chunk))

        try:
            generate(pipeline, args.prompt, frames=frames, seed=args.seed, num_steps=args.steps,
                     input_frames=input_frames, switches=switches,
                     transition_blocks=args.transition_blocks, on_frames=emit)
        finally:
            bar.close()
            pipeline.shutdown()
    if worker.device.startswith("cuda"):
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t1
    print(json.dumps({
        "output": str(out), "frames": frames, "resolution": [width, height], "fps": pipeline.fps,
        "mode": "v2v" if v2v else "t2v", "config": cfg.name, "vae": pipeline.vae.kind,
        "steps": args.steps, "seed": args.seed, "load_seconds": round(load_s, 3),
        "generate_seconds": round(gen_s, 3), "frames_per_second": round(frames / gen_s, 2),
        "stages": parallel.stages, "executor": parallel.executor,
    }))
    return 0
