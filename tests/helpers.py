"""Small model, pool and prompt builders shared by the tests."""

from __future__ import annotations

import dataclasses

import torch

from rollcast.workers import CachePolicy, CausalWanModel, KVCachePool, ModelConfig

LATENT_HW = (8, 8)  # 4x4 = 16 tokens per latent frame


def tiny_model(seed: int = 0, **overrides: object) -> CausalWanModel:
    cfg = ModelConfig.preset("tiny")
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = CausalWanModel(cfg)
    model.init_weights(seed, head_std=0.2)
    return model.eval()


def make_pool(model: CausalWanModel, policy: CachePolicy, rows: int = 4) -> KVCachePool:
    cfg = model.config
    return KVCachePool(
        layers=model.layers, rows=rows, policy=policy,
        tokens_per_frame=(LATENT_HW[0] // 2) * (LATENT_HW[1] // 2),
        num_heads=cfg.num_heads, head_dim=cfg.head_dim,
    )


def random_prompt(model: CausalWanModel, seed: int, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(length, model.config.text_dim, generator=g)
    return model.prompt_kv(ctx)
