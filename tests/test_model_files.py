"""Finding each component in a model directory by its published file name."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollcast.workers.checkpoint import CheckpointError
from rollcast.workers.model_files import ModelFiles


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_a_wan_model_directory(tmp_path: Path) -> None:
    touch(tmp_path, "config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
          "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json",
          "safetensors/taew2_1.safetensors")
    files = ModelFiles.resolve(tmp_path)
    assert files.dit.name == "diffusion_pytorch_model.safetensors"
    assert files.vae("wan").name == "Wan2.1_VAE.pth"
    assert files.vae("tiny") == tmp_path / "safetensors" / "taew2_1.safetensors"
    assert files.text() == (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "google" / "umt5-xxl")


def test_a_distilled_checkpoint_wins_over_the_base_dit(tmp_path: Path) -> None:
    touch(tmp_path, "diffusion_pytorch_model.safetensors", "self_forcing_dmd.pt", "Wan2.1_VAE.pth")
    assert ModelFiles.resolve(tmp_path).dit.name == "self_forcing_dmd.pt"
    touch(tmp_path, "longlive_base.pt")
    with pytest.raises(CheckpointError, match="several candidate DiT checkpoints"):
        ModelFiles.resolve(tmp_path)


def test_sharded_dit_resolves_to_its_index(tmp_path: Path) -> None:
    touch(tmp_path, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json")
    assert ModelFiles.resolve(tmp_path).dit.name == "model.safetensors.index.json"


def test_missing_parts_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ModelFiles.resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no DiT checkpoint inside"):
        ModelFiles.resolve(tmp_path)
    touch(tmp_path, "model.pt", "models_t5_umt5-xxl-enc-bf16.pth")
    files = ModelFiles.resolve(tmp_path)
    with pytest.raises(CheckpointError, match=r"no wan VAE weights \(Wan2.1_VAE.pth\)"):
        files.vae("wan")
    with pytest.raises(CheckpointError, match="taew2_1"):
        files.vae("tiny")
    with pytest.raises(CheckpointError, match="no tokenizer directory"):
        files.text()
