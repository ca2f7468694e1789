"""What an fp8 KV cache does to a session's outputs: the error of `--kv-dtype fp8` against the cache
in the model's dtype.

One model, one prompt, one seed, two KV pools: the same session is streamed block by block through
each, and the clean latents x0 of every finished block and the frames the VAE decodes from them are
compared. Everything else is identical (weights, noise, sampler), so the differences are the
quantisation of K/V and how it propagates through later blocks, which attend to the quantised
cache of earlier ones.

    python -m rollcast.kernels.kv_error --blocks 8 --resolution 128x128

Figures for the tiny preset are in docs/benchmarking.md ("fp8 KV cache"). Random weights are a
sanity check, not a quality claim: run it with `--checkpoint` on the model that will serve.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rollcast.workers.cache_policy import POLICIES, CachePolicy
from rollcast.workers.dit_forward import LocalDiT
from rollcast.workers.frame_decoder import FrameDecoder
from rollcast.workers.model_config import PRESETS, ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import (
    DTYPES,
    WorkerSpec,
    build_model,
    build_pool,
    parse_resolution,
    runner_over,
)
from rollcast.workers.vae import build_vae

__all__ = ["KVErrorReport", "fp8_kv_error", "main"]


@dataclass(frozen=True)
class KVErrorReport:
    blocks: int
    x0_rel_error: float  # ||x0_fp8 - x0_ref|| / ||x0_ref|| over all blocks together
    x0_block_rel_errors: list[float]  # the same per block, in stream order
    frames_mean_abs: float  # mean |difference| of the decoded uint8 frames, in levels of 255
    frames_max_abs: int  # largest difference of any channel of any pixel
    frames_changed: float  # fraction of uint8 values that differ at all
    kv_bytes_ref: int  # the pool of each run (K/V and, for fp8, the scales)
    kv_bytes_fp8: int


def _stream(spec: WorkerSpec, model: torch.nn.Module, embedding: Tensor, blocks: int,
            decoder: FrameDecoder, key: int) -> tuple[list[Tensor], list[np.ndarray], int]:
    """x0 and decoded frames of the first `blocks` blocks of one session; the pool's bytes."""
    pool = build_pool(spec, model.layers)  # type: ignore[arg-type]
    runner = runner_over(spec, LocalDiT(model, pool))  # type: ignore[arg-type]
    state = runner.open("kv-error", runner.prompt_kv(embedding), seed=spec.seed)
    decoder.open(key)
    x0s: list[Tensor] = []
    frames: list[np.ndarray] = []
    while len(x0s) < blocks:
        (x0,) = runner.run([state])
        if x0 is not None:
            x0s.append(x0.float().cpu())
            frames.append(decoder.decode(key, x0))
    return x0s, frames, pool.nbytes


@torch.no_grad()
def fp8_kv_error(spec: WorkerSpec, *, blocks: int = 8) -> KVErrorReport:
    """Stream `blocks` blocks of one session with `spec`'s model, KV cache in the model's dtype and
    in fp8, and compare x0 and the decoded frames (the VAE is the config's default, seeded)."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    ref_spec, fp8_spec = replace(spec, kv_dtype=None), replace(spec, kv_dtype="fp8")
    model = build_model(ref_spec)
    cfg = spec.config
    g = torch.Generator().manual_seed(spec.seed)
    embedding = torch.randn(cfg.text_len // 2, cfg.text_dim, generator=g)
    vae = build_vae(cfg.default_vae, cfg.vae_size, device=spec.device, seed=spec.seed)  # type: ignore[arg-type]
    decoder = FrameDecoder(vae)
    x_ref, f_ref, bytes_ref = _stream(ref_spec, model, embedding, blocks, decoder, key=0)
    x_fp8, f_fp8, bytes_fp8 = _stream(fp8_spec, model, embedding, blocks, decoder, key=1)
    per_block = [float((a - b).norm() / b.norm()) for a, b in zip(x_fp8, x_ref, strict=True)]
    all_ref, all_fp8 = torch.cat([x.flatten() for x in x_ref]), torch.cat([x.flatten() for x in x_fp8])
    diff = np.abs(np.concatenate([f.ravel() for f in f_fp8]).astype(np.int16)
                  - np.concatenate([f.ravel() for f in f_ref]).astype(np.int16))
    return KVErrorReport(
        blocks=blocks,
        x0_rel_error=float((all_fp8 - all_ref).norm() / all_ref.norm()),
        x0_block_rel_errors=per_block,
        frames_mean_abs=float(diff.mean()),
        frames_max_abs=int(diff.max()),
        frames_changed=float((diff > 0).mean()),
        kv_bytes_ref=bytes_ref,
        kv_bytes_fp8=bytes_fp8,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rollcast.kernels.kv_error",
                                description="fp8 KV cache error on a session's x0 and decoded frames")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", type=Path, help="DiT checkpoint (random weights if absent)")
    p.add_argument("--policy", default="self-forcing", choices=sorted(POLICIES))
    p.add_argument("--rope", choices=("baked", "late"), help="override the policy's RoPE mode")
    p.add_argument("--resolution", default="128x128", help="WIDTHxHEIGHT")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="model (and reference cache) dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    policy = CachePolicy.preset(args.policy)
    if args.rope:
        policy = policy.replace(rope=args.rope)
    sdv2 = args.policy == "streamdiffusionv2"  # 1-frame blocks and its own sampler, as `rollcast` runs it
    spec = WorkerSpec(
        config=ModelConfig.preset(args.config), policy=policy,
        sampler=SamplerConfig.preset("streamdiffusionv2" if sdv2 else "self-forcing"),
        resolution=parse_resolution(args.resolution), max_sessions=1, frames_per_block=1 if sdv2 else None,
        device=args.device, dtype=DTYPES[args.dtype], checkpoint=args.checkpoint, seed=args.seed,
    )
    r = fp8_kv_error(spec, blocks=args.blocks)
    if args.json:
        print(json.dumps(asdict(r)))
        return
    print(f"fp8 vs {args.dtype} KV cache, {args.config} {args.resolution} {args.policy} "
          f"({policy.rope} RoPE), {r.blocks} blocks:")
    print(f"  x0 relative error {r.x0_rel_error:.2e} (per block "
          f"{', '.join(f'{e:.1e}' for e in r.x0_block_rel_errors)})")
    print(f"  decoded uint8 frames: mean |diff| {r.frames_mean_abs:.3f} levels, max {r.frames_max_abs}, "
          f"{100 * r.frames_changed:.1f} % of values changed")
    print(f"  KV pool bytes: {r.kv_bytes_ref} -> {r.kv_bytes_fp8} ({r.kv_bytes_fp8 / r.kv_bytes_ref:.3f}x)")


if __name__ == "__main__":
    main()
