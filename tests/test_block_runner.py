"""Sessions through the model runner: batching, determinism, policies."""

from __future__ import annotations

import pytest
import torch

from rollcast.workers import CachePolicy
from rollcast.workers.block_runner import BlockRunner
from rollcast.workers.sampler import FlowMatchSampler, SamplerConfig
from rollcast.workers.stream_state import BlockInput, Work
from tests.helpers import LATENT_HW, make_pool, random_prompt


def runner_for(model, policy, rows=4, sampler="self-forcing", fpb=None):
    return BlockRunner.local(model, make_pool(model, policy, rows),
                       FlowMatchSampler(SamplerConfig.preset(sampler)),
                       latent_hw=LATENT_HW, frames_per_block=fpb)


def run_blocks(runner, state, blocks):
    """Drive one session alone until `blocks` blocks have come out."""
    out = []
    while len(out) < blocks:
        (x0,) = runner.run([state])
        if x0 is not None:
            out.append(x0)
    return out


SMALL = CachePolicy("small", sink_frames=3, window_frames=6)


def test_block_takes_steps_plus_context_pass(model):
    runner = runner_for(model, SMALL)
    s = runner.open("a", random_prompt(model, 1), seed=7)
    kinds = []
    for _ in range(10):
        kinds.append(s.next_work)
        runner.run([s])
    assert kinds == [Work.DENOISE] * 4 + [Work.CONTEXT] + [Work.DENOISE] * 4 + [Work.CONTEXT]
    assert s.frames_done == 6


def test_same_seed_same_frames_and_different_seed_differs(model):
    runner = runner_for(model, SMALL)
    a = run_blocks(runner, runner.open("a", random_prompt(model, 1), seed=7), 3)
    b = run_blocks(runner, runner.open("b", random_prompt(model, 1), seed=7), 3)
    c = run_blocks(runner, runner.open("c", random_prompt(model, 1), seed=8), 3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.allclose(a[2], c[2])


def test_batch_at_different_positions_and_steps_equals_each_alone(model):
    """Three sessions: different prompts, seeds, step counts and stream positions (one past the
    window roll) share forwards, and each produces what it produces alone."""
    prompts = [random_prompt(model, i) for i in range(3)]
    lead = [5, 0, 2]  # blocks each session runs alone before the shared part
    steps = [4, 2, 1]
    total = 4

    alone = []
    runner = runner_for(model, SMALL)
    for i in range(3):
        s = runner.open(f"s{i}", prompts[i], seed=100 + i, num_steps=steps[i])
        alone.append(run_blocks(runner, s, lead[i] + total)[lead[i]:])
        runner.close(s)

    runner = runner_for(model, SMALL)
    states = [runner.open(f"s{i}", prompts[i], seed=100 + i, num_steps=steps[i]) for i in range(3)]
    for s, n in zip(states, lead, strict=True):
        run_blocks(runner, s, n)
    # Offset the sessions' steps inside their blocks, then run everyone in every forward.
    runner.run([states[0]])
    got: list[list[torch.Tensor]] = [[], [], []]
    mixed_steps = False
    while any(len(g) < total for g in got):
        active = [i for i in range(3) if len(got[i]) < total]
        mixed_steps |= len({(states[i].next_work, states[i].step) for i in active}) > 1
        outs = runner.run([states[i] for i in active])
        for i, o in zip(active, outs, strict=True):
            if o is not None:
                got[i].append(o)
    assert mixed_steps
    assert states[0].frames_done > runner.pool.capacity  # its window has rolled
    for i in range(3):
        for x, y in zip(alone[i], got[i], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_fewer_steps_take_effect_at_next_block(model):
    runner = runner_for(model, SMALL)
    s = runner.open("a", random_prompt(model, 1), seed=1)
    runner.run([s])
    runner.set_num_steps(s, 1)
    assert len(s.timesteps) == 4  # the current block keeps its schedule
    run_blocks(runner, s, 1)
    runner.run([s])  # context pass of block 0
    assert s.next_work is Work.DENOISE and s.step == 0
    runner.run([s])  # block 1, one step
    assert s.timesteps == [1000.0] and s.next_work is Work.CONTEXT


def test_close_frees_the_row_and_full_pool_is_an_error(model):
    from rollcast.workers import CacheFullError

    runner = runner_for(model, SMALL, rows=2)
    a = runner.open("a", random_prompt(model, 1), seed=1)
    runner.open("b", random_prompt(model, 1), seed=1)
    with pytest.raises(CacheFullError):
        runner.open("c", random_prompt(model, 1), seed=1)
    runner.close(a)
    assert runner.open("c", random_prompt(model, 1), seed=1).row == a.row


def test_mixed_shapes_in_one_batch_are_rejected(model):
    policy = CachePolicy("ll", sink_frames=3, window_frames=6, recache_on_prompt_switch=True)
    runner = runner_for(model, policy)
    a = runner.open("a", random_prompt(model, 1), seed=1)
    b = runner.open("b", random_prompt(model, 1), seed=2)
    run_blocks(runner, a, 2)
    runner.run([a])
    runner.set_prompt(a, random_prompt(model, 5))
    assert a.next_work is Work.RECACHE
    with pytest.raises(ValueError, match="different forward shapes"):
        runner.run([a, b])


# -- StreamDiffusionV2 ----------------------------------------------------------------------

def sdv2(threshold):
    return CachePolicy.preset("streamdiffusionv2").replace(sink_refresh_threshold=threshold)


def test_sdv2_has_no_context_pass_and_resets_rope_positions(model):
    runner = runner_for(model, sdv2(None), sampler="streamdiffusionv2", fpb=1)
    s = runner.open("a", random_prompt(model, 1), seed=1, num_steps=2)
    starts = []
    for _ in range(60):
        starts.append(s.block_rope_start if s.step else None)
        runner.run([s])
        assert s.next_work is Work.DENOISE
        runner.run([s])
        starts[-1] = s.block_rope_start
    # Positions run 0..49, then restart at capacity - 1 = 5 and keep going.
    assert starts[:50] == list(range(50))
    assert starts[50:53] == [5, 6, 7]
    assert s.frames_done == 60


def sink_slot_frames(runner, s, layer=0):
    sink = runner.policy.sink_frames
    return runner.pool.slot_frame[layer, s.row, :sink].tolist(), runner.pool.slot_frame[
        layer, s.row, sink:].tolist()


def test_sdv2_sink_refresh_replaces_a_sink_frame_once_per_block(model):
    # Cosine similarity is <= 1, so threshold 1.01 always refreshes once the sink is full.
    runner = runner_for(model, sdv2(1.01), sampler="streamdiffusionv2", fpb=1)
    s = runner.open("a", random_prompt(model, 1), seed=1, num_steps=2)
    run_blocks(runner, s, 3)
    sink, ring = sink_slot_frames(runner, s)
    assert sink == [0, 1, 2] and ring == [-1, -1, -1]
    run_blocks(runner, s, 1)  # frame 3: both steps of the block write the same sink slot
    sink, ring = sink_slot_frames(runner, s)
    assert sorted(sink).count(3) == 1 and 3 not in ring
    assert ring == [-1, -1, -1]


def test_sdv2_sink_refresh_off_below_threshold(model):
    runner = runner_for(model, sdv2(-1.01), sampler="streamdiffusionv2", fpb=1)
    s = runner.open("a", random_prompt(model, 1), seed=1, num_steps=2)
    run_blocks(runner, s, 7)
    sink, ring = sink_slot_frames(runner, s)
    assert sink == [0, 1, 2] and sorted(ring) == [4, 5, 6]


# -- LongLive ----------------------------------------------------------------------------------

def test_longlive_recache_rewrites_window_and_keeps_sink(model):
    policy = CachePolicy.preset("longlive").replace(window_frames=6)
    runner = runner_for(model, policy)
    s = runner.open("a", random_prompt(model, 1), seed=1)
    run_blocks(runner, s, 3)
    runner.run([s])  # context pass of block 2
    pool = runner.pool
    last = max(pool.layers)
    before = pool.k[last - pool.layers.start, s.row].clone()
    runner.set_prompt(s, random_prompt(model, 9))
    assert s.next_work is Work.RECACHE
    assert runner.bucket(s) == ("recache", 6)
    runner.run([s])
    after = pool.k[last - pool.layers.start, s.row]
    t = pool.tokens_per_frame
    assert torch.equal(before[: 3 * t], after[: 3 * t])  # sink untouched
    assert (before[3 * t :] - after[3 * t :]).abs().max() > 1e-3  # window re-encoded
    assert s.next_work is Work.DENOISE and s.prompt is not None


def test_longlive_switch_after_the_first_block_has_nothing_to_recache(model):
    # Only the kept sink is cached: the switch takes effect at the next block, with no forward
    # over an empty frame list (that crashed `rollcast generate --switch 9:...` on tiny).
    runner = runner_for(model, CachePolicy.preset("longlive"))
    s = runner.open("a", random_prompt(model, 1), seed=1)
    run_blocks(runner, s, 1)
    runner.run([s])  # context pass of block 0: the sink
    assert s.frames_done == 3 and s.next_work is Work.DENOISE
    before = runner.pool.k.clone()
    new = random_prompt(model, 9)
    runner.set_prompt(s, new)
    assert s.next_work is Work.DENOISE and not s.recache_pending
    assert torch.equal(before, runner.pool.k)
    assert len(run_blocks(runner, s, 1)) == 1 and s.prompt is new
    runner.run([s])  # context pass of block 1: one window block cached now, so it is re-cached
    runner.set_prompt(s, random_prompt(model, 3))
    assert s.next_work is Work.RECACHE and runner.bucket(s) == ("recache", 3)


def test_longlive_recache_without_global_sink_rewrites_sink_too(model):
    policy = CachePolicy.preset("longlive").replace(window_frames=6, keep_sink_on_recache=False)
    runner = runner_for(model, policy)
    s = runner.open("a", random_prompt(model, 1), seed=1)
    run_blocks(runner, s, 3)
    runner.run([s])
    pool = runner.pool
    last = max(pool.layers) - pool.layers.start
    before = pool.k[last, s.row].clone()
    runner.set_prompt(s, random_prompt(model, 9))
    assert runner.bucket(s) == ("recache", 9)
    runner.run([s])
    t = pool.tokens_per_frame
    assert (before[: 3 * t] - pool.k[last, s.row, : 3 * t]).abs().max() > 1e-3


def test_prompt_switch_without_recache_policy_keeps_self_attention_cache(model):
    runner = runner_for(model, SMALL)
    s = runner.open("a", random_prompt(model, 1), seed=1)
    run_blocks(runner, s, 2)
    runner.run([s])
    before = runner.pool.k.clone()
    new = random_prompt(model, 9)
    runner.set_prompt(s, new)
    assert s.next_work is Work.DENOISE
    assert torch.equal(before, runner.pool.k)
    runner.run([s])
    assert s.prompt is new


def test_closed_session_cannot_run_into_a_reused_row(model):
    runner = runner_for(model, SMALL, rows=1)
    a = runner.open("a", random_prompt(model, 1), seed=1)
    runner.close(a)
    runner.close(a)  # closing twice is harmless
    b = runner.open("b", random_prompt(model, 2), seed=2)
    assert b.row == a.row
    with pytest.raises(ValueError, match=r"already closed: \['a'\]"):
        runner.run([a, b])
    assert b.step == 0  # nothing ran


def test_kv_batch_rejects_unallocated_rows_and_ragged_frames(model):
    pool = make_pool(model, SMALL, rows=2)
    row = pool.allocate()
    kw = dict(grid_hw=(4, 4), rope=model.rope)
    with pytest.raises(ValueError, match="not allocated"):
        pool.batch(rows=[1 - row], frames=[[0]], rope_positions=[[0]], new_block=[True], **kw)
    other = pool.allocate()
    with pytest.raises(ValueError, match="same number of frames"):
        pool.batch(rows=[row, other], frames=[[0], [0, 1]], rope_positions=[[0], [0, 1]],
                   new_block=[True, True], **kw)


def test_v2v_block_starts_from_the_noised_input_at_the_controller_timestep(model, monkeypatch):
    policy = CachePolicy.preset("streamdiffusionv2")
    runner = runner_for(model, policy, sampler="streamdiffusionv2-v2v", fpb=1)
    s = runner.open("v", random_prompt(model, 1), seed=3, num_steps=2, v2v=True)
    assert not s.ready
    with pytest.raises(ValueError, match="without input"):
        runner.run([s])
    z = torch.randn(runner.block_shape, generator=torch.Generator().manual_seed(5))
    runner.add_input(s, BlockInput(z, noise_scale=0.75, timestep=650.0))
    assert s.ready
    seen = {}
    forward = model.forward

    def spy(x, t, prompts, attend):
        seen.setdefault("x", x.clone())
        seen.setdefault("t", t.clone())
        return forward(x, t, prompts, attend)

    monkeypatch.setattr(model, "forward", spy)
    eps = torch.randn(runner.block_shape, generator=torch.Generator().manual_seed(3))
    (out,) = runner.run([s])
    assert out is None and s.timesteps == [650.0, 500.0]
    torch.testing.assert_close(seen["x"][0], 0.75 * eps + 0.25 * z)
    assert seen["t"].flatten().tolist() == [650.0]
    with pytest.raises(ValueError, match="text-to-video"):
        runner.add_input(runner.open("t", random_prompt(model, 1), seed=1), BlockInput(z, 0.5, 400.0))
    with pytest.raises(ValueError, match="input latents must be"):
        runner.add_input(s, BlockInput(z[:, :, :4], 0.5, 400.0))
