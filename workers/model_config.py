"""Configuration of the causal Wan2.1 DiT: presets and the geometry derived from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Wan2.1 text-to-video DiT. Field names follow Wan's `config.json`."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    # Latent frames per autoregressive block (3 for Self-Forcing/CausVid/LongLive, 1 for SDV2 v2v).
    frames_per_block: int = 3
    # VAE compression (t, h, w) between pixels and latents.
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    # Pixel (width, height) the model was trained at.
    default_resolution: tuple[int, int] = (832, 480)
    # Which VAE shapes go with this model ("full" = Wan2.1_VAE / taew2_1, "small" = the tiny
    # model's) and which VAE is used when none is asked for.
    vae_size: str = "full"
    default_vae: str = "wan"
    # Text encoder preset whose output feeds `text_embedding` (text_dim wide).
    text_encoder: str = "umt5-xxl"
    fps: int = 16  # frames per second of the video the model was trained on
    # KV cache policy preset used when none is asked for: the one the weights stream best with.
    default_policy: str = "self-forcing"
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 8:
            raise ValueError(f"head_dim {self.head_dim} must be even and at least 8")
        if self.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 for the causal model")
        if self.vae_size not in ("full", "small"):
            raise ValueError(f"vae_size must be 'full' or 'small', got {self.vae_size!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def latent_hw(self, width: int, height: int) -> tuple[int, int]:
        """Latent (h, w) for a pixel resolution; both must divide by the VAE and patch strides."""
        sh = self.vae_stride[1] * self.patch_size[1]
        sw = self.vae_stride[2] * self.patch_size[2]
        if width % sw or height % sh or width <= 0 or height <= 0:
            raise ValueError(
                f"resolution {width}x{height} must be positive multiples of {sw}x{sh} "
                f"(VAE stride x patch size)"
            )
        return height // self.vae_stride[1], width // self.vae_stride[2]

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size[1]) * (latent_w // self.patch_size[2])

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model config {name!r}; presets: {sorted(PRESETS)}") from None

    @classmethod
    def from_wan_config_json(cls, cfg: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Build from a Wan `config.json` (`{"dim":1536,"ffn_dim":8960,...}`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        for key in ("patch_size", "vae_stride", "default_resolution"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        missing = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in kwargs]
        if missing:
            raise ValueError(f"model config is missing {missing}")
        return cls(name=name, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Small enough for CPU tests and the default demo on 2 cores; same structure and key names.
    "tiny": ModelConfig(
        dim=128, ffn_dim=256, num_heads=4, num_layers=4, freq_dim=64, text_dim=64, text_len=32,
        default_resolution=(128, 128), vae_size="small", default_vae="tiny", text_encoder="tiny",
        # The shipped weights hold motion over long streams and adapt to prompt switches better
        # with LongLive's 9-frame window and re-cache than with the 18-frame one (docs/quality.md).
        default_policy="longlive", name="tiny",
    ),
    "wan-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, name="wan-1.3b"),
    "wan-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, name="wan-14b"),
}
