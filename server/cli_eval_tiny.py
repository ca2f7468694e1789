"""`rollcast eval-tiny`: generate shapes videos through the serving path and score them with the
colour/centroid detector (no neural judge). Modes: text-to-video over held-out prompts, a prompt
switch mid-stream (frames until the new prompt holds), and video-to-video on a rendered input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from rollcast.server.cli_args import (
    add_model_args,
    add_weights_arg,
    positive_int,
    random_weights,
    worker_spec,
)
from rollcast.workers.shape_detector import score_tracks
from rollcast.workers.shapes_dataset import COLORS, ShapesDataset, parse_prompt
from rollcast.workers.tiny_eval import (
    EVAL_SEED_OFFSET,
    METRICS,
    eval_clips,
    evaluate,
    run_tracked,
    switch_score,
)
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, checkpoint_help="model directory to evaluate (default: the shipped tiny weights)")
    add_weights_arg(p)
    p.add_argument("--prompts", type=positive_int, default=20, help="held-out prompts (videos)")
    p.add_argument("--frames", type=positive_int, default=100, help="frames per video")
    p.add_argument("--steps", type=positive_int, default=1, help="denoising steps (1-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("t2v", "switch", "v2v"), default="t2v")
    p.add_argument("--switch-at", type=positive_int, default=None,
                   help="switch mode: frame of the prompt change (default: half the video)")
    p.add_argument("--horizons", default="100,1000,5000",
                   help="t2v: report the 100 frames ending at each of these frames")
    p.add_argument("--sink-frames", type=int, default=None, help="override the policy's sink (latent frames)")
    p.add_argument("--window-frames", type=positive_int, default=None,
                   help="override the policy's window (latent frames, the current block included)")
    p.add_argument("--json", type=Path, required=True, help="write the results here")


def _switch_eval(pipeline: VideoPipeline, args: argparse.Namespace) -> dict[str, object]:
    w, h = pipeline.resolution
    at = args.switch_at or args.frames // 2
    clips = eval_clips(2 * args.prompts, args.seed, w, h)
    rows = []
    for i in range(args.prompts):
        first, second = clips[2 * i], clips[2 * i + 1]
        run = run_tracked(pipeline, first.prompt, frames=args.frames, seed=args.seed + i, steps=args.steps,
                          switches=((at, second.prompt),))
        rows.append({"from": first.prompt, "to": second.prompt, **switch_score(run.tracks, second, at)})
    def adapted(key: str) -> list[int]:
        return [r[key] for r in rows if r[key] is not None]  # type: ignore[misc]
    summary = {}
    for key in ("color_frames_to_adapt", "direction_frames_to_adapt"):
        got = adapted(key)
        summary[key] = {"adapted": len(got) / len(rows), "median": float(np.median(got)) if got else None,
                        "mean": round(float(np.mean(got)), 1) if got else None}
    return {"switch_at": at, "summary": summary, "videos": rows}


def _v2v_eval(pipeline: VideoPipeline, args: argparse.Namespace) -> dict[str, object]:
    """Input: a rendered clip; prompt: the same motion in another colour (a restyle)."""
    w, h = pipeline.resolution
    data = ShapesDataset(EVAL_SEED_OFFSET + args.seed + 1, w, h)
    rows = []
    for i in range(args.prompts):
        clip = data.clip(i)
        colours = [c for c in COLORS if c not in {o.color for o in clip.objects}]
        target = dataclasses.replace(clip, objects=tuple(
            dataclasses.replace(o, color=colours[j % len(colours)]) for j, o in enumerate(clip.objects)))
        run = run_tracked(pipeline, target.prompt, frames=args.frames, seed=args.seed + i, steps=args.steps,
                          input_frames=data.frames(i, args.frames))
        restyled = score_tracks(run.tracks, parse_prompt(target.prompt, w, h)).summary()
        kept = score_tracks(run.tracks, parse_prompt(clip.prompt, w, h)).summary()
        rows.append({"input": clip.prompt, "prompt": target.prompt, "vs_prompt": restyled,
                     "input_color_kept": kept["color"]})
    mean = {k: round(float(np.mean([r["vs_prompt"][k] for r in rows])), 4) for k in METRICS}
    return {"summary": {"vs_prompt": mean, "input_color_kept": round(float(np.mean(
        [r["input_color_kept"] for r in rows])), 4)}, "videos": rows}


def run(args: argparse.Namespace) -> int:
    horizons = tuple(int(x) for x in args.horizons.split(",") if x.strip())
    synthetic = random_weights(args)  # before worker_spec reads the checkpoint
    worker = worker_spec(args, v2v=args.mode == "v2v")
    overrides = {k: v for k, v in (("sink_frames", args.sink_frames), ("window_frames", args.window_frames))
                 if v is not None}
    if overrides:
        worker = dataclasses.replace(worker, policy=worker.policy.replace(**overrides))
    t0 = time.perf_counter()
    pipeline = VideoPipeline.build(PipelineSpec(worker=worker, synthetic_weights=synthetic))
    try:
        if args.mode == "t2v":
            result = evaluate(pipeline, prompts=args.prompts, frames=args.frames, seed=args.seed,
                              steps=args.steps, horizons=horizons)
        elif args.mode == "switch":
            result = _switch_eval(pipeline, args)
        else:
            result = _v2v_eval(pipeline, args)
    finally:
        pipeline.shutdown()
    result = {"mode": args.mode, "checkpoint": str(args.checkpoint) if args.checkpoint else "default",
              "policy": worker.policy.name, "sink_frames": worker.policy.sink_frames,
              "window_frames": worker.policy.window_frames, "rope": worker.policy.rope,
              "steps": args.steps, "frames": args.frames, "prompts": args.prompts,
              "seconds": round(time.perf_counter() - t0, 1), **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    short = {k: result[k] for k in ("mode", "policy", "frames", "prompts", "seconds")}
    short.update({k: result[k] for k in ("whole", "at_frame", "summary") if k in result})
    print(json.dumps(short), file=sys.stdout)
    return 0
