"""The rolling KV cache path equals a cache-free masked forward over the whole sequence."""

from __future__ import annotations

import pytest
import torch

from rollcast.workers import CachePolicy, PromptBatch
from rollcast.workers.reference_forward import reference_forward
from tests.helpers import LATENT_HW, make_pool, random_prompt


def run_blockwise(model, policy, x, t, prompts, fpb, rows=None):
    """Feed the sequence block by block through the cache (one forward per block)."""
    b, _, n, _, _ = x.shape
    pool = make_pool(model, policy, rows=max(4, b))
    rows = rows or [pool.allocate() for _ in range(b)]
    outs = []
    for start in range(0, n, fpb):
        frames = [list(range(start, start + fpb))] * b
        kv = pool.batch(rows=rows, frames=frames, rope_positions=frames, new_block=[True] * b,
                        grid_hw=(LATENT_HW[0] // 2, LATENT_HW[1] // 2), rope=model.rope)
        outs.append(model(x[:, :, start : start + fpb], t[:, start : start + fpb], prompts, kv.attend))
    return torch.cat(outs, dim=2)


def inputs(model, b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.config.in_dim, n, *LATENT_HW, generator=g)
    t = torch.rand(b, n, generator=g) * 1000  # a different timestep on every frame
    prompts = PromptBatch.stack([random_prompt(model, 10 + i) for i in range(b)])
    return x, t, prompts


@pytest.mark.parametrize("rope", ["baked", "late"])
def test_no_eviction_equals_block_causal_reference(model, rope):
    fpb, n = 3, 12
    policy = CachePolicy("t", sink_frames=3, window_frames=12, rope=rope)  # nothing evicted
    x, t, prompts = inputs(model, 2, n)
    cached = run_blockwise(model, policy, x, t, prompts, fpb)
    ref = reference_forward(model, x, t, prompts, frames_per_block=fpb)
    assert cached.shape == (2, 16, n, *LATENT_HW)
    torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rope", ["baked", "late"])
@pytest.mark.parametrize(("fpb", "sink", "window"), [(3, 3, 6), (2, 1, 3), (1, 0, 2)])
def test_rolled_window_equals_sink_plus_window_reference(model, rope, fpb, sink, window):
    n = 6 * fpb + 3 * window  # enough blocks for the ring to wrap more than once
    n -= n % fpb
    policy = CachePolicy("t", sink_frames=sink, window_frames=window, rope=rope)
    x, t, prompts = inputs(model, 2, n, seed=3)
    cached = run_blockwise(model, policy, x, t, prompts, fpb)
    ref = reference_forward(model, x, t, prompts, frames_per_block=fpb, sink=sink, window=window,
                            rope=rope)
    torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)
    # And the roll matters: attending to everything gives a different answer.
    full = reference_forward(model, x, t, prompts, frames_per_block=fpb)
    assert (full[:, :, -fpb:] - ref[:, :, -fpb:]).abs().max() > 1e-3


def test_late_rope_has_no_position_limit(model):
    """Late RoPE keeps window-relative positions, so frame 2000 is like frame 20."""
    policy = CachePolicy("t", sink_frames=1, window_frames=2, rope="late")
    pool = make_pool(model, policy)
    x, t, prompts = inputs(model, 1, 3, seed=5)
    outs = []
    for base in (20, 2000):
        rows = [pool.allocate()]
        frames_seq = [[0], [base - 1], [base]]
        out = None
        for i, fr in enumerate(frames_seq):
            kv = pool.batch(rows=rows, frames=[fr], rope_positions=[fr], new_block=[True],
                            grid_hw=(4, 4), rope=model.rope)
            out = model(x[:, :, i : i + 1], t[:, i : i + 1], prompts, kv.attend)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_window_smaller_than_block_is_rejected():
    policy = CachePolicy("t", sink_frames=1, window_frames=2)
    with pytest.raises(ValueError, match="smaller than a block of 3"):
        policy.validate_block(3)
