"""Checkpoint containers, key layouts, LoRA merge and the errors for bad files."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rollcast.workers import CausalWanModel, ModelConfig
from rollcast.workers.checkpoint import (
    WRITE_FORMATS,
    CheckpointError,
    infer_config,
    load_checkpoint,
    read_state_dict,
    synthetic_model,
    write_checkpoint,
)
from rollcast.workers.checkpoint_keys import (
    lora_state_dict,
    lora_target_modules,
    to_diffusers,
    to_wan_layout,
)

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def source() -> CausalWanModel:
    return synthetic_model(TINY, seed=3)


def assert_same_weights(a: CausalWanModel, b: CausalWanModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def fresh() -> CausalWanModel:
    return CausalWanModel(TINY)


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
def test_round_trip_every_format(tmp_path, source, fmt):
    target = tmp_path / ("ckpt" if fmt in ("safetensors-sharded", "diffusers") else
                         ("model.safetensors" if fmt == "safetensors" else "model.pt"))
    written = write_checkpoint(source.state_dict(), target, fmt, max_shard_bytes=200_000)
    if fmt in ("safetensors-sharded", "diffusers"):
        assert written.name.endswith(".index.json")
        assert len(list(target.glob("*.safetensors"))) > 1  # really sharded
    model = load_checkpoint(fresh(), target)  # a directory or a file both work
    assert_same_weights(model, source)


def test_pt_prefers_generator_ema_and_can_be_told_otherwise(tmp_path, source):
    other = synthetic_model(TINY, seed=4)
    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in source.state_dict().items()},
                "generator": {f"model.{k}": v for k, v in other.state_dict().items()},
                "critic": {"x": torch.zeros(1)}}, path)
    assert_same_weights(load_checkpoint(fresh(), path), source)
    assert_same_weights(load_checkpoint(fresh(), path, container="generator"), other)


def test_diffusers_layout_swaps_norm2_and_norm3(source):
    d = to_diffusers(source.state_dict())
    assert "blocks.0.norm2.weight" in d and "blocks.0.norm3.weight" not in d
    assert torch.equal(d["blocks.0.norm2.weight"], source.state_dict()["blocks.0.norm3.weight"])
    assert "condition_embedder.time_proj.weight" in d and "blocks.1.attn1.to_out.0.bias" in d
    assert "scale_shift_table" in d and "blocks.0.scale_shift_table" in d
    assert to_wan_layout(d).keys() == source.state_dict().keys()


def test_lora_merge_matches_explicit_update(tmp_path, source):
    g = torch.Generator().manual_seed(0)
    targets = lora_target_modules(TINY.num_layers)
    assert len(targets) == 10 * TINY.num_layers
    rank = 4
    deltas = {}
    for m in targets:
        w = source.state_dict()[f"{m}.weight"]
        deltas[m] = (torch.randn(rank, w.shape[1], generator=g) * 0.1,
                     torch.randn(w.shape[0], rank, generator=g) * 0.1)
    base = tmp_path / "longlive_base.pt"
    write_checkpoint(source.state_dict(), base, "pt-generator-ema")
    lora = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora_state_dict(deltas)}, lora)
    merged = load_checkpoint(fresh(), base, lora=lora, lora_alpha=8.0)
    sd = merged.state_dict()
    for m, (a, b) in deltas.items():
        expect = source.state_dict()[f"{m}.weight"] + (8.0 / rank) * (b @ a)
        torch.testing.assert_close(sd[f"{m}.weight"], expect)
    # Untargeted weights stay as they were.
    assert torch.equal(sd["head.head.weight"], source.state_dict()["head.head.weight"])


def test_lora_that_does_not_fit_is_named(tmp_path, source):
    base = tmp_path / "base.safetensors"
    write_checkpoint(source.state_dict(), base)
    lora = tmp_path / "lora.pt"
    torch.save(lora_state_dict({"blocks.0.self_attn.q": (torch.zeros(2, 7), torch.zeros(128, 2))}), lora)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q: A \(2, 7\)"):
        load_checkpoint(fresh(), base, lora=lora)


def test_truncated_safetensors_is_a_clear_error(tmp_path, source):
    path = tmp_path / "model.safetensors"
    write_checkpoint(source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(fresh(), path)


def test_truncated_pt_is_a_clear_error(tmp_path, source):
    path = tmp_path / "model.pt"
    write_checkpoint(source.state_dict(), path, "pt-generator-ema")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(fresh(), path)


def test_wrong_shape_missing_and_unexpected_keys_are_listed(tmp_path, source):
    sd = dict(source.state_dict())
    sd["blocks.1.ffn.0.weight"] = torch.zeros(7, 128)
    del sd["head.head.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "model.safetensors"
    write_checkpoint(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(fresh(), path)
    msg = str(err.value)
    assert "missing (1): head.head.bias" in msg
    assert "unexpected (1): blocks.0.extra.weight" in msg
    assert "mis-shaped (1): blocks.1.ffn.0.weight (7, 128) != (256, 128)" in msg


def test_missing_shard_and_bad_index(tmp_path, source):
    d = tmp_path / "sharded"
    write_checkpoint(source.state_dict(), d, "safetensors-sharded", max_shard_bytes=200_000)
    shards = sorted(d.glob("*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"shard {shards[1].name} is missing")):
        read_state_dict(d)
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        read_state_dict(d)


def test_not_a_state_dict_and_no_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no \.safetensors"):
        read_state_dict(empty)


def test_stage_model_loads_only_its_layers(tmp_path, source):
    path = tmp_path / "model.safetensors"
    write_checkpoint(source.state_dict(), path)
    stage = load_checkpoint(CausalWanModel(TINY, layers=range(1, 3)), path)
    assert set(stage.blocks) == {"1", "2"}
    assert torch.equal(stage.state_dict()["blocks.2.ffn.0.weight"],
                       source.state_dict()["blocks.2.ffn.0.weight"])


def test_config_from_config_json_or_preset_shapes(tmp_path, source):
    path = tmp_path / "a" / "model.safetensors"
    write_checkpoint(source.state_dict(), path, config=TINY)
    cfg = json.loads((path.parent / "config.json").read_text())
    assert cfg["dim"] == 128 and cfg["num_layers"] == 4
    assert infer_config(path).dim == 128
    bare = tmp_path / "b" / "model.pt"
    write_checkpoint(source.state_dict(), bare, "pt-generator")
    assert infer_config(bare) == TINY


def test_real_preset_parameter_counts_on_meta():
    with torch.device("meta"):
        small = CausalWanModel(ModelConfig.preset("wan-1.3b"))
        big = CausalWanModel(ModelConfig.preset("wan-14b"))
    assert sum(p.numel() for p in small.parameters()) == 1_418_996_800
    assert sum(p.numel() for p in big.parameters()) == 14_288_491_584
    sd = small.state_dict()
    assert len(sd) == 825
    assert sd["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert sd["time_projection.1.weight"].shape == (9216, 1536)
    assert sd["head.modulation"].shape == (1, 2, 1536)
    assert sd["blocks.29.ffn.2.weight"].shape == (1536, 8960)
    assert sd["blocks.0.cross_attn.norm_k.weight"].shape == (1536,)
    assert "blocks.0.norm1.weight" not in sd and "blocks.0.norm3.bias" in sd


def test_meta_model_gets_weights_assigned_in_target_dtype(tmp_path, source):
    path = tmp_path / "model.safetensors"
    write_checkpoint(source.state_dict(), path)
    with torch.device("meta"):
        model = CausalWanModel(TINY)
    load_checkpoint(model, path, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(v.device.type == "cpu" and v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["blocks.3.ffn.2.weight"], source.state_dict()["blocks.3.ffn.2.weight"].bfloat16())
