"""Build everything one worker needs to stream latents: model, KV pool, sampler, runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rollcast.workers.block_runner import BlockRunner
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.checkpoint import load_checkpoint, synthetic_model
from rollcast.workers.dit_forward import DiTForward, LocalDiT
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.model_files import ModelFiles
from rollcast.workers.sampler import FlowMatchSampler, SamplerConfig
from rollcast.workers.vae import VaeSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


KV_DTYPES = ("bf16", "fp8")  # --kv-dtype: bf16 = K/V in the model's dtype (bf16 on GPU), fp8 = e4m3


def parse_resolution(text: str) -> tuple[int, int]:
    """'832x480' -> (832, 480)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution must look like WIDTHxHEIGHT (e.g. 832x480), got {text!r}") from None
    return w, h


@dataclass(frozen=True)
class WorkerSpec:
    config: ModelConfig
    policy: CachePolicy
    sampler: SamplerConfig
    resolution: tuple[int, int]
    max_sessions: int = 4
    frames_per_block: int | None = None  # default: the model config's
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    checkpoint: Path | None = None
    lora: Path | None = None
    seed: int = 0
    # KV cache storage: None or "bf16" keeps K/V in `dtype`; "fp8" stores e4m3 with per-token-per-head
    # scales, about half the cache memory of bf16 (docs/benchmarking.md has its error on outputs).
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype (--kv-dtype) must be one of {', '.join(KV_DTYPES)}, "
                             f"got {self.kv_dtype!r}")


def build_model(spec: WorkerSpec, layers: range | None = None) -> CausalWanModel:
    """The DiT, or the pipeline stage of it holding `layers`: random weights without a
    checkpoint (seeded per layer, so stages agree with the whole model), else loaded."""
    if spec.checkpoint is None:
        model = synthetic_model(spec.config, seed=spec.seed, dtype=spec.dtype, device=spec.device,
                                layers=layers)
    else:
        with torch.device("meta"):
            model = CausalWanModel(spec.config, layers=layers)
        dit = ModelFiles.resolve(spec.checkpoint).dit  # a file, or the DiT inside a model directory
        model = load_checkpoint(model, dit, lora=spec.lora, dtype=spec.dtype, device=spec.device)
    return model.eval().requires_grad_(False)


def build_pool(spec: WorkerSpec, layers: range) -> KVCachePool:
    """KV cache rows for `spec.max_sessions` sessions over `layers` (none: row bookkeeping only)."""
    cfg = spec.config
    lh, lw = cfg.latent_hw(*spec.resolution)
    return KVCachePool(
        layers=layers, rows=spec.max_sessions, policy=spec.policy,
        tokens_per_frame=cfg.tokens_per_frame(lh, lw), num_heads=cfg.num_heads,
        head_dim=cfg.head_dim, dtype=spec.dtype, kv_dtype="fp8" if spec.kv_dtype == "fp8" else None,
        device=spec.device,
    )


def runner_over(spec: WorkerSpec, dit: DiTForward) -> BlockRunner:
    """The block runner of a worker whose layers run wherever `dit` runs them."""
    return BlockRunner(dit, FlowMatchSampler(spec.sampler), latent_hw=spec.config.latent_hw(*spec.resolution),
                       frames_per_block=spec.frames_per_block)


def build_runner(spec: WorkerSpec, vae: VaeSpec | None = None) -> BlockRunner:
    """All layers in this process (the caller decodes: `vae` is for runners that decode)."""
    model = build_model(spec)
    return runner_over(spec, LocalDiT(model, build_pool(spec, model.layers)))
