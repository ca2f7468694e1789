"""Reading, validating and writing causal Wan DiT checkpoints in their published containers.

Read:
- safetensors: one file, or shards listed by `*.safetensors.index.json` (Wan 14B, diffusers);
- torch pickles (`.pt`, `.pth`, `.bin`): a dict holding `generator_ema`, `generator` or
  `state_dict` (Self-Forcing, CausVid, StreamDiffusionV2, LongLive), or a raw state dict;
- a directory: its index, else its single safetensors file, else its single pickle.
Keys are mapped to Wan names (`checkpoint_keys.py`), an optional LoRA is merged, and the result
must match the model exactly: otherwise `CheckpointError` lists the missing, unexpected and
mis-shaped keys.

Write: the same containers, for synthetic checkpoints of any preset (tests, demos).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.checkpoint_keys import merge_lora, to_diffusers, to_wan_layout
from rollcast.workers.model_config import PRESETS, ModelConfig

# Entries tried in order; `generator_lora` is how LongLive stores its adapter.
CONTAINER_KEYS = ("generator_ema", "generator", "state_dict", "generator_lora")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

WriteFormat = Literal[
    "safetensors", "safetensors-sharded", "diffusers", "pt-generator-ema", "pt-generator",
    "pt-state-dict", "pt-raw",
]
WRITE_FORMATS: tuple[str, ...] = WriteFormat.__args__  # type: ignore[attr-defined]


# The fields of Wan's `config.json` (the rest of ModelConfig is rollcast's own).
WAN_CONFIG_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim",
                   "text_dim", "text_len", "eps")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


# -- reading containers -------------------------------------------------------------------------


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _load_index(path: Path) -> dict[str, Tensor]:
    try:
        weight_map: dict[str, str] = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a safetensors index with a weight_map ({e})") from e
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{path}: shard {shard} is missing")
        out.update(_load_safetensors(shard_path))
    absent = sorted(k for k in weight_map if k not in out)
    if absent:
        raise CheckpointError(f"{path}: keys listed in the index are not in their shards: "
                              f"{preview(absent)}")
    return out


def _load_pickle(path: Path, container: str | None) -> dict[str, Tensor]:
    try:
        try:  # memory-map zip checkpoints so a 28 GB file is not read twice
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        # torch's unpickling errors run to paragraphs; the first line names the problem.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    keys = (container,) if container else CONTAINER_KEYS
    for key in keys:
        if key in obj:
            obj = obj[key]
            break
    else:
        if container:
            raise CheckpointError(f"{path}: no {container!r} entry (has {preview(sorted(obj))})")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {preview(bad)}")
    return dict(obj)


def resolve_checkpoint_file(path: str | Path) -> Path:
    """The file to read for `path`: itself, or the right file inside a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    for pattern in ("*.safetensors.index.json", "*.safetensors", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(p.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{p}: several candidate files, name one: "
                                  f"{[f.name for f in found]}")
    raise CheckpointError(f"{p}: no .safetensors, index.json or .pt checkpoint inside")


def read_state_dict(path: str | Path, *, container: str | None = None) -> dict[str, Tensor]:
    """Raw tensors of a checkpoint file or directory, keys as stored."""
    f = resolve_checkpoint_file(path)
    name = f.name
    if name.endswith(".index.json"):
        return _load_index(f)
    if name.endswith(".safetensors"):
        return _load_safetensors(f)
    if name.endswith(PICKLE_SUFFIXES):
        return _load_pickle(f, container)
    raise CheckpointError(f"{f}: unknown checkpoint type (expected .safetensors, "
                          f".safetensors.index.json or one of {PICKLE_SUFFIXES})")


# -- fitting a model ------------------------------------------------------------------------------


def preview(items: list[str], n: int = 12) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (+{len(items) - n} more)" if len(items) > n else shown


def key_mismatch(expected: Mapping[str, torch.Size], sd: Mapping[str, Tensor], *,
                 ignore: Collection[str] = ()) -> str | None:
    """What keeps `sd` from fitting `expected` (missing, unexpected and mis-shaped keys, first few
    of each), or None when it fits exactly. Keys in `ignore` are neither missing nor unexpected."""
    missing = sorted(k for k in expected if k not in sd and k not in ignore)
    unexpected = sorted(k for k in sd if k not in expected and k not in ignore)
    misshaped = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(v)}"
                       for k, v in expected.items() if k in sd and sd[k].shape != v)
    parts = [f"{label} ({len(keys)}): {preview(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    return "; ".join(parts) or None


def check_state_dict(model: CausalWanModel, sd: Mapping[str, Tensor]) -> None:
    """Raise `CheckpointError` unless `sd` (Wan names) has exactly the model's keys and shapes.

    Blocks outside the model's layer range (a pipeline stage) are neither missing nor unexpected.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    held = {str(i) for i in model.layers}
    other_layers = {
        k for k in sd if k.startswith("blocks.") and k.split(".")[1] not in held
        and k.split(".")[1].isdigit() and int(k.split(".")[1]) < model.config.num_layers
    }
    problem = key_mismatch(expected, sd, ignore=other_layers)
    if problem:
        raise CheckpointError(f"checkpoint does not fit {model.config.name}: {problem}")


def write_state_dict(sd: Mapping[str, Tensor], path: str | Path) -> Path:
    """A raw state dict as `.pth`/`.pt` (torch.save) or `.safetensors`, as the VAEs are published."""
    out = Path(path)
    cpu = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_file(cpu, str(out))
    elif out.suffix in (".pth", ".pt"):
        torch.save(cpu, str(out))
    else:
        raise ValueError(f"{out}: write a .pth, .pt or .safetensors file")
    return out


def load_checkpoint(
    model: CausalWanModel,
    path: str | Path,
    *,
    container: str | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CausalWanModel:
    """Load a checkpoint (any supported container and layout, optional LoRA) into `model`.

    A model built on the meta device gets the checkpoint's tensors assigned directly (cast to
    `dtype` on `device`), so a 14B model is never materialised twice.
    """
    sd = to_wan_layout(read_state_dict(path, container=container))
    if lora is not None:
        try:
            merge_lora(sd, read_state_dict(lora), alpha=lora_alpha)
        except ValueError as e:
            raise CheckpointError(f"{lora}: {e}") from e
    check_state_dict(model, sd)
    held = model.state_dict()
    on_meta = any(p.is_meta for p in model.parameters())
    weights = {k: sd[k].to(device=device or (None if not on_meta else "cpu"),
                           dtype=dtype or held[k].dtype) for k in held}
    model.load_state_dict(weights, strict=True, assign=on_meta)
    return model


def infer_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint: its directory's `config.json`, else the preset whose
    shapes it matches."""
    p = Path(path)
    cfg_file = (p if p.is_dir() else p.parent) / "config.json"
    if cfg_file.is_file():
        try:
            cfg = ModelConfig.from_wan_config_json(json.loads(cfg_file.read_text()), name=p.stem)
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: not a usable model config ({e})") from e
        # A config.json describing a preset's shapes gets the preset (its name, resolution, ...).
        for preset in PRESETS.values():
            if all(getattr(preset, k) == getattr(cfg, k) for k in WAN_CONFIG_KEYS):
                return preset
        return cfg
    sd = to_wan_layout(read_state_dict(path))
    for cfg in PRESETS.values():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in CausalWanModel(cfg).state_dict().items()}
        if shapes.keys() == sd.keys() and all(sd[k].shape == s for k, s in shapes.items()):
            return cfg
    raise CheckpointError(f"{path}: no config.json beside it and its shapes match no preset "
                          f"({sorted(PRESETS)}); pass the config explicitly")


# -- writing ---------------------------------------------------------------------------------


def write_checkpoint(
    state_dict: Mapping[str, Tensor],
    path: str | Path,
    fmt: WriteFormat = "safetensors",
    *,
    config: ModelConfig | None = None,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write Wan-named weights in one of the published containers; returns the file written.

    `safetensors-sharded` and `diffusers` write a directory (`path`) with an index and shards;
    a given `config` is written beside the weights as Wan's `config.json`.
    """
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    out = Path(path)
    if fmt in ("safetensors-sharded", "diffusers"):
        out.mkdir(parents=True, exist_ok=True)
        written = _write_sharded(to_diffusers(sd) if fmt == "diffusers" else sd, out, max_shard_bytes)
        cfg_dir = out
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        prefixed = {f"model.{k}": v for k, v in sd.items()}
        if fmt == "safetensors":
            save_file(sd, str(out))
        elif fmt == "pt-generator-ema":
            torch.save({"generator_ema": prefixed, "generator": prefixed}, str(out))
        elif fmt == "pt-generator":
            torch.save({"generator": prefixed}, str(out))
        elif fmt == "pt-state-dict":
            torch.save({"state_dict": sd}, str(out))
        elif fmt == "pt-raw":
            torch.save(sd, str(out))
        else:
            raise ValueError(f"unknown checkpoint format {fmt!r}; formats: {WRITE_FORMATS}")
        written, cfg_dir = out, out.parent
    if config is not None:
        wan = {"_class_name": "WanModel", "model_type": "t2v",
               **{k: getattr(config, k) for k in WAN_CONFIG_KEYS}}
        (cfg_dir / "config.json").write_text(json.dumps(wan, indent=2))
    return written


def _write_sharded(sd: dict[str, Tensor], out: Path, max_shard_bytes: int) -> Path:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        if size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map.update(dict.fromkeys(shard, name))
    index = out / "diffusion_pytorch_model.safetensors.index.json"
    total = sum(v.nbytes for v in sd.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                indent=2))
    return index


def synthetic_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", layers: range | None = None,
) -> CausalWanModel:
    """A randomly initialised model of any config (the same cost as real weights), built
    directly on `device`; with `layers`, the stage holding those layers of the same model."""
    with torch.device(device):
        model = CausalWanModel(config, layers=layers)
    model.init_weights(seed)
    return model.to(dtype)
