"""The pipeline around the block runner: frame accounting per block, prompt switches and timed
transitions, the prompt cache, v2v input buffering, and seamless streaming decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.video_file import to_uint8
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate, run_block


def pipeline_for(policy: str = "self-forcing", sampler: str = "self-forcing", fpb: int | None = None):
    worker = WorkerSpec(config=ModelConfig.preset("tiny"), policy=CachePolicy.preset(policy),
                        sampler=SamplerConfig.preset(sampler), resolution=(64, 64), max_sessions=2,
                        frames_per_block=fpb)
    return VideoPipeline.build(PipelineSpec(worker=worker))


@pytest.fixture(scope="module")
def pipe() -> VideoPipeline:
    return pipeline_for()


def collect(pipe: VideoPipeline, prompt: str, frames: int, **kw) -> np.ndarray:
    chunks: list[np.ndarray] = []
    n = generate(pipe, prompt, frames=frames, seed=kw.pop("seed", 5), num_steps=1,
                 on_frames=chunks.append, **kw)
    out = np.concatenate(chunks)
    assert n == len(out) == frames
    return out


def test_blocks_decode_to_9_then_12_frames(pipe: VideoPipeline) -> None:
    s = pipe.open("a", "x", seed=1, num_steps=1)
    counts = [len(s.decode(run_block(pipe.runner, s.state))) for _ in range(3)]
    pipe.close(s)
    assert counts == [9, 12, 12] == [s.block_frames(b) for b in range(3)]
    assert pipe.runner.pool.free_rows == 2  # the row went back


def test_streaming_decode_has_no_seams(pipe: VideoPipeline) -> None:
    """Block-by-block decode through the session's VAE state equals decoding all latents at once."""
    s = pipe.open("a", "waves", seed=2, num_steps=1)
    x0s = [run_block(pipe.runner, s.state) for _ in range(3)]
    streamed = np.concatenate([s.decode(x) for x in x0s])
    pipe.close(s)
    whole = to_uint8(pipe.vae.decode(torch.cat(x0s, dim=1)[None])[0])
    assert streamed.shape == whole.shape == (33, 64, 64, 3)
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 1


def test_switch_changes_only_later_blocks(pipe: VideoPipeline) -> None:
    base = collect(pipe, "a red circle", 33)
    switched = collect(pipe, "a red circle", 33, switches=[(5, "a blue square")])
    np.testing.assert_array_equal(base[:9], switched[:9])  # block 0 had started at frame 0 < 5
    assert not np.array_equal(base[9:21], switched[9:21])
    direct = collect(pipe, "a red circle", 33, switches=[(0, "a blue square")])
    assert not np.array_equal(direct[:9], base[:9])


def test_transition_blends_over_n_blocks_then_holds_the_target(pipe: VideoPipeline) -> None:
    s = pipe.open("t", "a red circle", seed=3, num_steps=1)
    start = s.embedding
    target = pipe.embed("a blue square")
    run_block(pipe.runner, s.state)
    s.set_prompt("a blue square", transition_blocks=3)
    seen = []
    for _ in range(5):
        s.before_block()
        seen.append(s.embedding)
        run_block(pipe.runner, s.state)
    pipe.close(s)
    dist = [float((e - target).norm()) for e in seen]
    assert dist[0] < float((start - target).norm())
    assert dist[0] > dist[1] > dist[2] > 0  # three blend steps
    assert dist[3] == dist[4] == 0  # then exactly the target


def test_prompt_embeddings_are_cached(pipe: VideoPipeline) -> None:
    before = pipe.prompts.misses
    pipe.embed("cached prompt")
    pipe.embed("  cached   prompt ")
    assert pipe.prompts.misses == before + 1
    blend = pipe.embed([("cached prompt", 0.5), ("another", 0.5)])
    assert blend.shape == (32, 64)


def test_v2v_input_is_buffered_per_block() -> None:
    pipe = pipeline_for("streamdiffusionv2", "streamdiffusionv2-v2v", fpb=1)
    s = pipe.open("v", "x", seed=0, num_steps=2, v2v=True)
    frames = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    assert s.push_frames(frames[:0]) == 0
    assert s.push_frames(frames[:3]) == 1  # block 0 takes 1 frame; 2 wait for block 1
    assert s.push_frames(frames[3:5]) == 1  # frames 1..4
    assert s.push_frames(frames[5:11]) == 1  # frames 5..8; 9 and 10 wait
    assert len(s.state.inputs) == 3
    first = s.state.inputs[0]
    assert first.noise_scale == pytest.approx(0.8) and first.timestep == 700.0
    with pytest.raises(ValueError, match=r"input frames must be \[T, 64, 64, 3\]"):
        s.push_frames(frames[:, :32])
    out = [len(s.decode(run_block(pipe.runner, s.state))) for _ in range(3)]
    assert out == [1, 4, 4]
    assert not s.state.ready  # block 3 waits for frames 9..12
    pipe.close(s)
    t2v = pipe.open("t", "x", seed=0)
    with pytest.raises(ValueError, match="text-to-video"):
        t2v.push_frames(frames)
