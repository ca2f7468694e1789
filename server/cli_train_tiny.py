"""`rollcast train-tiny`: train the tiny default model on the shapes dataset and write its model
directory (DiT + config.json, tiny VAE, word text encoder) with `train_tiny.json` beside it.
`--vae-only` trains and writes the VAE alone; `--vae-from` trains the DiT on such a VAE;
`--finetune-from` fine-tunes a written model on its own rollouts."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from rollcast.server.cli_args import fraction, positive_float, positive_int
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.tiny_training import TrainConfig, finetune_tiny, train_tiny, train_vae_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="wall-clock budget (the VAE's steps or a quarter of it, the rest for the DiT); "
                        "the step counts reached are recorded in train_tiny.json (default: run the step "
                        "counts)")
    # Step and size flags default to None so that one a phase would ignore is an error, not a no-op.
    p.add_argument("--vae-steps", type=positive_int, default=None,
                   help=f"VAE training steps (default {TrainConfig.vae_steps})")
    p.add_argument("--dit-steps", type=positive_int, default=None,
                   help=f"DiT training steps (default {TrainConfig.dit_steps})")
    p.add_argument("--clips", type=positive_int, default=None,
                   help=f"dataset clips encoded for the DiT (default {TrainConfig.clips})")
    p.add_argument("--batch", type=positive_int, default=None,
                   help=f"DiT batch (default {TrainConfig.batch})")
    p.add_argument("--smear-share", type=fraction, default=None,
                   help="share of DiT samples whose window context is smeared along the object's motion "
                        f"axis, the target kept sharp (default {TrainConfig.smear_share})")
    p.add_argument("--dilate-share", type=fraction, default=None,
                   help="share of the smeared samples (needs --smear-share) whose objects are dilated on "
                        "both axes instead (bloated, as two-object streams fail; default "
                        f"{TrainConfig.dilate_share})")
    p.add_argument("--smear-each", action="store_const", const=True, default=None,
                   help="smear each object of a two-object clip along its own axis of motion (needs "
                        "--smear-share; default: both along the first object's)")
    p.add_argument("--fade-share", type=fraction, default=None,
                   help="share of the smeared two-object samples (needs --smear-share) whose context fades "
                        f"one object toward the background instead (default {TrainConfig.fade_share})")
    p.add_argument("--two-object-share", type=fraction, default=None,
                   help="share of DiT samples drawn from two-object clips (a quarter of the dataset; "
                        f"default {TrainConfig.two_object_share}: uniform)")
    p.add_argument("--window-blocks", type=positive_int, default=None,
                   help="most context blocks after the sink in a DiT sample, the current one included: "
                        f"6 matches the self-forcing cache (18 latent frames), 3 longlive's (default "
                        f"{TrainConfig.window_blocks})")
    phase = p.add_mutually_exclusive_group()
    phase.add_argument("--vae-only", action="store_true",
                       help="train the VAE alone and write it (with train_tiny.json) to --out")
    phase.add_argument("--vae-from", type=Path, default=None, metavar="VAE_DIR",
                       help="train the DiT on the VAE a --vae-only run wrote there instead of a new one "
                            "(--minutes then all go to the DiT)")
    phase.add_argument("--finetune-from", type=Path, default=None, metavar="DIR",
                       help="fine-tune the DiT of a model directory train-tiny wrote on its own rollouts "
                            "(Self-Forcing style), with its VAE, for --dit-steps or --minutes")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


DIT_FLAGS = ("dit_steps", "clips", "batch", "smear_share", "dilate_share", "smear_each", "fade_share",
             "two_object_share", "window_blocks")


def _reject_ignored_flags(args: argparse.Namespace) -> None:
    """A flag the chosen phase does not use would silently change nothing; name it instead."""
    if args.vae_steps is not None and (args.vae_from or args.finetune_from):
        phase = "--vae-from" if args.vae_from else "--finetune-from"
        raise ValueError(f"--vae-steps: {phase} reuses a trained VAE, so no VAE steps run")
    for flag, what in (("dilate_share", "dilates a share of the smeared contexts"),
                       ("smear_each", "smears each object of the smeared contexts apart"),
                       ("fade_share", "fades an object in a share of the smeared contexts")):
        if getattr(args, flag) and not args.smear_share:
            raise ValueError(f"--{flag.replace('_', '-')}: {what}, so it needs --smear-share")
    if args.vae_only:
        for flag in DIT_FLAGS:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: --vae-only trains no DiT")


def _check_window_blocks(window_blocks: int | None) -> None:
    """A sample's window must fit in a clip after its sink block, and hold at least two blocks."""
    most = TrainConfig.clip_latents // ModelConfig.preset("tiny").frames_per_block - 1
    if window_blocks is not None and not 2 <= window_blocks <= most:
        raise ValueError(f"--window-blocks: must be 2 to {most} (a clip holds the sink block and {most} "
                         f"more), got {window_blocks}")


def run(args: argparse.Namespace) -> int:
    _reject_ignored_flags(args)
    _check_window_blocks(args.window_blocks)
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out}: exists and is not empty")
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("vae_steps", *DIT_FLAGS) if getattr(args, k) is not None}
    cfg = TrainConfig(seed=args.seed, **given)

    def log(record: dict[str, object]) -> None:
        print(json.dumps(record), file=sys.stderr, flush=True)

    command = shlex.join(["rollcast", "train-tiny", *sys.argv[2:]]) if len(sys.argv) > 1 else "train-tiny"
    if args.vae_only:
        out = train_vae_dir(args.out, cfg, minutes=args.minutes, command=command, log=log)
    elif args.finetune_from:
        out = finetune_tiny(args.out, cfg, args.finetune_from, minutes=args.minutes, command=command, log=log)
    else:
        out = train_tiny(args.out, cfg, minutes=args.minutes, command=command, log=log,
                         vae_from=args.vae_from)
    record = json.loads((out / "train_tiny.json").read_text())
    summary = {"written": str(out), "seed": args.seed, "vae_steps": record.get("vae_steps_done"),
               "dit_steps": record.get("dit_steps_done"), "seconds": record["seconds"].get("total"),
               "vae_reconstruction": record["vae_reconstruction"]}
    print(json.dumps({k: v for k, v in summary.items() if v is not None}))
    return 0
