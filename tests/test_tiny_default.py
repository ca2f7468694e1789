"""The `tiny` preset's default weights: when a trained model directory is shipped as package data
(`model_files.SHIPPED_TINY_DIR`), a pipeline built without a checkpoint loads it; the seeded random
weights stay one flag away. Here a directory written by `train_tiny` (two steps) stands in for the
shipped one, so the loading path is tested whatever is in the package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rollcast.workers import model_files
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.checkpoint import read_state_dict
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.model_files import ModelFiles, shipped_checkpoint
from rollcast.workers.sampler import SamplerConfig
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.text_encoder import UMT5TextEncoder
from rollcast.workers.tiny_text import WordTextEncoder
from rollcast.workers.tiny_training import TrainConfig, train_tiny
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, generate


def worker() -> WorkerSpec:
    return WorkerSpec(config=ModelConfig.preset("tiny"), policy=CachePolicy.preset("self-forcing"),
                      sampler=SamplerConfig.preset("self-forcing"), resolution=(64, 64), max_sessions=1)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(width=64, height=64, vae_steps=2, dit_steps=2, clips=2, clip_latents=9, batch=1,
                      window_blocks=2)
    return train_tiny(tmp_path_factory.mktemp("tiny") / "m", cfg, command="rollcast train-tiny (test)")


@pytest.fixture
def shipped(trained_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(model_files, "SHIPPED_TINY_DIR", trained_dir)
    return trained_dir


def test_only_the_tiny_preset_has_shipped_weights(shipped: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert shipped_checkpoint(ModelConfig.preset("tiny")) == shipped
    assert shipped_checkpoint(ModelConfig.preset("wan-1.3b")) is None
    monkeypatch.setattr(model_files, "SHIPPED_TINY_DIR", tmp_path / "absent")
    assert shipped_checkpoint(ModelConfig.preset("tiny")) is None  # nothing shipped: random weights


def test_tiny_without_checkpoint_loads_the_shipped_directory(shipped: Path) -> None:
    files = ModelFiles.resolve(shipped)
    pipe = VideoPipeline.build(PipelineSpec(worker=worker()))
    assert isinstance(pipe.text, WordTextEncoder)
    on_disk = read_state_dict(files.dit)
    held = pipe.runner.model.state_dict()["head.head.weight"]
    torch.testing.assert_close(held, on_disk["head.head.weight"])
    frames: list = []
    generate(pipe, "a red circle moving left slowly on a black background", frames=9, seed=0, num_steps=1,
             on_frames=frames.append)
    assert sum(len(f) for f in frames) == 9


def test_synthetic_weights_and_the_wan_vae_keep_random_weights(shipped: Path) -> None:
    on_disk = read_state_dict(ModelFiles.resolve(shipped).dit)["head.head.weight"]
    specs = (PipelineSpec(worker=worker(), synthetic_weights=True), PipelineSpec(worker=worker(), vae="wan"))
    for spec in specs:
        pipe = VideoPipeline.build(spec)
        assert isinstance(pipe.text, UMT5TextEncoder)
        assert not pipe.runner.model.state_dict()["head.head.weight"].equal(on_disk)
