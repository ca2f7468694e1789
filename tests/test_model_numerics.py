"""Wan2.1 numerics that are easy to get wrong (reference/model.md section 10)."""

from __future__ import annotations

import copy
import math

import torch

from rollcast.workers import CausalWanModel, ModelConfig
from rollcast.workers.causal_wan import sinusoidal_embedding
from rollcast.workers.rope import Rope3D, apply_rope, rope_axis_pairs
from tests.helpers import random_prompt


def test_sinusoid_is_cos_then_sin():
    e = sinusoidal_embedding(8, torch.tensor([2.0]))
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expect = [math.cos(2 * f) for f in freqs] + [math.sin(2 * f) for f in freqs]
    assert e.dtype == torch.float64
    torch.testing.assert_close(e[0], torch.tensor(expect, dtype=torch.float64))


def test_rope_split_and_rotation_match_complex_reference():
    assert rope_axis_pairs(128) == (22, 21, 21)
    assert rope_axis_pairs(32) == (6, 5, 5)
    rope = Rope3D(32)
    gh, gw = 3, 4
    pos = torch.tensor([[5, 9]])
    cos, sin = rope.cos_sin(pos, gh, gw)
    x = torch.randn(1, 2 * gh * gw, 2, 32, dtype=torch.float64)
    got = apply_rope(x, cos, sin)
    # Wan: complex pairs of adjacent values times exp(i * angle), angle per axis own ladder.
    def axis(n: int, p: float) -> list[float]:
        return [p * 10000 ** (-(2 * i) / (2 * n)) for i in range(n)]
    for tok, (f, h, w) in enumerate((f, h, w) for f in (5, 9) for h in range(gh) for w in range(gw)):
        ang = torch.tensor(axis(6, f) + axis(5, h) + axis(5, w), dtype=torch.float64)
        z = torch.view_as_complex(x[0, tok].reshape(2, 16, 2).contiguous()) * torch.polar(
            torch.ones_like(ang), ang)
        torch.testing.assert_close(got[0, tok], torch.view_as_real(z).reshape(2, 32), atol=1e-5, rtol=1e-5)


def test_per_frame_timesteps_modulate_each_frame(model):
    x = torch.randn(1, 16, 3, 8, 8)
    t = torch.tensor([[900.0, 400.0, 20.0]])
    _, e, e0, _ = model.embed(x, t)
    for i in range(3):
        _, ei, e0i, _ = model.embed(x[:, :, i : i + 1], t[:, i : i + 1])
        torch.testing.assert_close(e0[:, i], e0i[:, 0])
        torch.testing.assert_close(e[:, i], ei[:, 0])
    assert not torch.allclose(e0[:, 0], e0[:, 1])


def test_text_is_zero_padded_before_embedding(model):
    g = torch.Generator().manual_seed(0)
    model = copy.deepcopy(model)
    with torch.no_grad():  # real checkpoints have non-zero biases, so f(0) != 0
        model.text_embedding[2].bias.normal_(generator=g)
    ctx = torch.randn(5, model.config.text_dim, generator=g)
    padded = torch.zeros(model.config.text_len, model.config.text_dim)
    padded[:5] = ctx
    a, b = model.prompt_kv(ctx), model.prompt_kv(padded)
    torch.testing.assert_close(a.k, b.k)
    assert a.k.shape == (4, 32, 4, 32)  # layers, text_len, heads, head_dim
    # Padding rows are not zeros after the embedding (f(0) = bias path), so they are attended.
    assert a.v[:, 5:].abs().sum() > 0


def test_qk_norm_is_over_full_dim_and_head_norm_has_no_affine():
    with torch.device("meta"):
        m = CausalWanModel(ModelConfig.preset("wan-1.3b"))
    sd = m.state_dict()
    assert sd["blocks.0.self_attn.norm_q.weight"].shape == (1536,)
    assert not any(k.startswith("head.norm") for k in sd)


def test_bf16_forward_close_to_fp32(model):
    from rollcast.workers import PromptBatch
    from rollcast.workers.reference_forward import reference_forward

    x = torch.randn(1, 16, 3, 8, 8)
    t = torch.full((1, 3), 500.0)
    p = PromptBatch.stack([random_prompt(model, 0)])
    ref = reference_forward(model, x, t, p, frames_per_block=3)
    low = copy.deepcopy(model).to(torch.bfloat16)
    pl = PromptBatch.stack([random_prompt(low, 0)])
    out = reference_forward(low, x, t, pl, frames_per_block=3)
    assert out.dtype == torch.float32  # the residual stream and head output stay fp32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel
