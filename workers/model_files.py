"""Where each component's weights are inside a checkpoint directory, by their published names.

A Wan2.1 model directory (`Wan2.1-T2V-1.3B/`) holds `config.json`, the DiT
(`diffusion_pytorch_model*.safetensors`), `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` and
the tokenizer in `google/umt5-xxl/`. The distilled causal checkpoints (`self_forcing_dmd.pt`,
`model.pt`, `longlive_base.pt`, ...) replace the DiT; put one beside the others (it wins over the
base `diffusion_pytorch_model` file). The tiny VAE is `taew2_1.safetensors` or `taew2_1.pth`, at the
top or under `safetensors/` as madebyollin/taehv publishes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rollcast.workers.checkpoint import PICKLE_SUFFIXES, CheckpointError, WriteFormat
from rollcast.workers.model_config import ModelConfig

WAN_VAE_FILE = "Wan2.1_VAE.pth"
TINY_VAE_FILES = ("taew2_1.safetensors", "taew2_1.pth", "safetensors/taew2_1.safetensors")
TEXT_ENCODER_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIRS = ("google/umt5-xxl", "tokenizer")
# The tiny model's trained word embedding (`tiny_text.py`), used instead of umT5 when present.
WORD_TEXT_ENCODER_FILE = "tiny_text_encoder.safetensors"
BASE_DIT_PREFIX = "diffusion_pytorch_model"
# The trained tiny model shipped as package data (`rollcast train-tiny` wrote it; its
# train_tiny.json says how): what the `tiny` preset loads when no checkpoint is given.
SHIPPED_TINY_DIR = Path(__file__).resolve().parent / "tiny_default"
_COMPONENT_NAMES = {WAN_VAE_FILE, TEXT_ENCODER_FILE, WORD_TEXT_ENCODER_FILE, "taew2_1.safetensors",
                    "taew2_1.pth"}


@dataclass(frozen=True)
class ModelFiles:
    root: Path
    dit: Path
    wan_vae: Path | None = None
    tiny_vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    word_text_encoder: Path | None = None

    @classmethod
    def resolve(cls, path: str | Path) -> ModelFiles:
        """A checkpoint file (the DiT alone) or a model directory."""
        p = Path(path)
        if p.is_file():
            return cls(root=p.parent, dit=p)
        if not p.is_dir():
            raise CheckpointError(f"{p}: no such checkpoint file or directory")
        return cls(
            root=p, dit=_find_dit(p),
            wan_vae=_first(p, (WAN_VAE_FILE,)),
            tiny_vae=_first(p, TINY_VAE_FILES),
            text_encoder=_first(p, (TEXT_ENCODER_FILE,)),
            tokenizer=next((p / d for d in TOKENIZER_DIRS if (p / d).is_dir()), None),
            word_text_encoder=_first(p, (WORD_TEXT_ENCODER_FILE,)),
        )

    def vae(self, kind: str) -> Path:
        found = self.wan_vae if kind == "wan" else self.tiny_vae
        if found is None:
            names = WAN_VAE_FILE if kind == "wan" else " or ".join(TINY_VAE_FILES)
            raise CheckpointError(f"{self.root}: no {kind} VAE weights ({names}) in the checkpoint "
                                  f"directory")
        return found

    def check_text(self) -> None:
        """Raise unless the directory holds a usable text encoder (either kind)."""
        if self.word_text_encoder is None:
            self.text()

    def text(self) -> tuple[Path, Path]:
        """(encoder weights, tokenizer directory)."""
        if self.text_encoder is None:
            raise CheckpointError(f"{self.root}: no text encoder weights ({TEXT_ENCODER_FILE}) in the "
                                  f"checkpoint directory")
        if self.tokenizer is None:
            raise CheckpointError(f"{self.root}: no tokenizer directory ({' or '.join(TOKENIZER_DIRS)}) "
                                  f"in the checkpoint directory")
        return self.text_encoder, self.tokenizer


def shipped_checkpoint(config: ModelConfig) -> Path | None:
    """The shipped model directory for `config`, if there is one: only the `tiny` preset's exact
    shapes have trained weights in the package."""
    from rollcast.workers.model_config import PRESETS

    if config != PRESETS["tiny"] or not (SHIPPED_TINY_DIR / f"{BASE_DIT_PREFIX}.safetensors").is_file():
        return None
    return SHIPPED_TINY_DIR


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


def _find_dit(root: Path) -> Path:
    """The DiT weights: a distilled causal checkpoint if present, else the base model's files."""
    causal = sorted(
        f for f in root.iterdir()
        if f.is_file() and f.name not in _COMPONENT_NAMES and not f.name.startswith(BASE_DIT_PREFIX)
        and (f.suffix in PICKLE_SUFFIXES or f.name.endswith((".safetensors", ".safetensors.index.json")))
    )
    index = [f for f in causal if f.name.endswith(".index.json")]
    if index:
        causal = index
    if len(causal) > 1:
        raise CheckpointError(f"{root}: several candidate DiT checkpoints, pass one file: "
                              f"{[f.name for f in causal]}")
    if causal:
        return causal[0]
    for name in (f"{BASE_DIT_PREFIX}.safetensors.index.json", f"{BASE_DIT_PREFIX}.safetensors"):
        if (root / name).is_file():
            return root / name
    raise CheckpointError(f"{root}: no DiT checkpoint inside (a distilled .pt/.safetensors or "
                          f"{BASE_DIT_PREFIX}.safetensors)")


def write_model_dir(
    config: ModelConfig,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dit_format: WriteFormat = "safetensors",
) -> ModelFiles:
    """Write a complete model directory of random weights under the published names: the same
    weights `seed` gives every component when no checkpoint is used, so loading the directory
    reproduces the checkpoint-free run exactly. The tokenizer is written only for text encoders
    with a built-in one (the tiny preset); a real umT5 directory needs google/umt5-xxl's files."""
    from rollcast.workers.checkpoint import synthetic_model, write_checkpoint
    from rollcast.workers.text_encoder import (
        TextEncoderConfig,
        builtin_tokenizer,
        synthetic_wan_t5_state_dict,
    )
    from rollcast.workers.tiny_vae import write_tiny_vae_checkpoint
    from rollcast.workers.vae import build_vae
    from rollcast.workers.wan_vae import write_wan_vae_checkpoint

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    dit_name = {"safetensors": f"{BASE_DIT_PREFIX}.safetensors",
                "safetensors-sharded": ".", "diffusers": "."}.get(dit_format, "model.pt")
    write_checkpoint(synthetic_model(config, seed=seed, dtype=dtype).state_dict(), root / dit_name,
                     dit_format, config=config)
    write_wan_vae_checkpoint(build_vae("wan", config.vae_size, seed=seed, dtype=dtype),  # type: ignore[arg-type]
                             root / WAN_VAE_FILE)
    write_tiny_vae_checkpoint(build_vae("tiny", config.vae_size, seed=seed, dtype=dtype),  # type: ignore[arg-type]
                              root / TINY_VAE_FILES[0])
    text_cfg = TextEncoderConfig.preset(config.text_encoder)
    torch.save(synthetic_wan_t5_state_dict(text_cfg, seed, dtype), root / TEXT_ENCODER_FILE)
    if text_cfg.builtin_tokenizer is not None:
        builtin_tokenizer(text_cfg.builtin_tokenizer).save_pretrained(str(root / TOKENIZER_DIRS[1]))
    return ModelFiles.resolve(root)
