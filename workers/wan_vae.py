"""The Wan2.1 VAE (`Wan2.1_VAE.pth`) with its temporal memory in explicit per-session state.

Modules, parameter names and shapes are those of Wan's `wan/modules/vae.py`, so the published
file loads strictly. What differs is where the streaming memory lives: Wan keeps one module-level
`feat_cache` list walked by a counter (plus a `'Rep'` string marker); here every layer with a
temporal receptive field owns a fixed slot number, and a state object owned by the caller holds,
per slot, the input frames that layer needs in front of its next chunk. One module can thus serve
many sessions, each with its own `WanEncodeState` / `WanDecodeState`.

Wan's causal rules, kept exactly:
- every 3x3x3 (and 3x1x1) causal conv sees two frames of zeros before the stream's first frame;
- encoder `downsample3d`: the stream's first frame passes through untouched, and later output
  frames are a stride-2 3x1x1 conv over all frames, the first included (j -> 2j-2, 2j-1, 2j);
- decoder `upsample3d`: the first frame passes through untouched too, but its time conv sees the
  later frames as a fresh, zero-padded sequence. (In Wan's decode the first latent leaves `'Rep'`
  in that conv's cache slot instead of frames, so frame 0 never reaches it.) Each later frame
  becomes two, interleaved from the two channel halves of the time conv's output.
Hence 1 + 4k video frames <-> 1 + k latents, and the first latent decodes to a single frame.

Two paths share the modules. Without a state (`encode` / `decode`) each temporal layer runs once
over the whole time axis with its zero past; with a state (`encode_chunk` / `decode_chunk`) a
chunk runs with the stored frames in front. Chunks are processed whole (no per-frame loop), which
equals Wan's one-chunk-at-a-time walk because nothing else in the network mixes frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollcast.workers.checkpoint import CheckpointError, key_mismatch, read_state_dict, write_state_dict

# Per-channel statistics of Wan2.1 latents: the DiT works on (mu - mean) / std.
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class WanVAEConfig:
    """Shape of a Wan2.1 VAE (`_video_vae` arguments; Wan spells the last one `temperal_...`)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN_LATENT_STD
    # StreamDiffusionV2 feeds the DiT un-normalised encoder output; False reproduces that quirk.
    scale_on_encode: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        # Three resamples (x8 in space), two of them temporal (x4 in time): the frame-count rule
        # and the decoder's channel halving assume exactly this.
        if len(self.dim_mult) != 4 or len(self.temporal_downsample) != 3:
            raise ValueError("dim_mult needs 4 entries and temporal_downsample 3")
        if sum(self.temporal_downsample) != 2:
            raise ValueError("exactly two of temporal_downsample must be True (x4 in time)")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean and latent_std need z_dim={self.z_dim} entries")

    @classmethod
    def preset(cls, name: str) -> WanVAEConfig:
        try:
            return WAN_VAE_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown Wan VAE preset {name!r}; presets: {sorted(WAN_VAE_PRESETS)}") from None


WAN_VAE_PRESETS: dict[str, WanVAEConfig] = {
    "full": WanVAEConfig(name="full"),  # Wan2.1_VAE.pth, 126,892,531 parameters
    # The tiny CPU model's: same structure and keys, 12x narrower; the latent space stays 16-wide.
    "small": WanVAEConfig(dim=8, name="small"),
}


# -- streaming state ------------------------------------------------------------------------------


@dataclass
class _StreamState:
    # Per temporal layer (by slot): the last input frames it saw, to put in front of the next chunk.
    # None until the layer has seen a frame; it then gets zeros in front, as at a stream's start.
    past: list[Tensor | None]
    # Whether the stream's first chunk went through; its first frame passes the temporal resamples.
    started: bool = False
    # (batch, height, width) of the stream's chunks, fixed by the first one.
    shape: tuple[int, int, int] | None = None

    def nbytes(self) -> int:
        """Memory held by the cached frames."""
        return sum(t.nbytes for t in self.past if t is not None)


@dataclass
class WanEncodeState(_StreamState):
    """One session's encoder memory (pixels -> latents)."""


@dataclass
class WanDecodeState(_StreamState):
    """One session's decoder memory (latents -> pixels)."""


# -- layers ------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """A Conv3d whose temporal padding is all in the past: output frame t sees input frames
    t-k+1..t. Spatial padding is the conv's own ('same'); a layer with k > 1 owns a state slot."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int]) -> None:
        kt, kh, kw = kernel
        super().__init__(cin, cout, kernel, padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1
        self.slot = -1  # its index in a state's `past`, if past_frames > 0 (see _number_slots)

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        if self.past_frames:
            x = self._with_past(x, state)
        return _conv3d(self, x)

    def _with_past(self, x: Tensor, state: _StreamState | None) -> Tensor:
        n = self.past_frames
        past = None if state is None else state.past[self.slot]
        x = F.pad(x, (0, 0, 0, 0, n, 0)) if past is None else torch.cat([past, x], dim=2)
        if state is not None:
            state.past[self.slot] = x[:, :, -n:].clone()  # a copy: a view would pin all of x
        return x


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and a per-channel gain `gamma`
    of shape (C, 1, 1, 1) for video or (C, 1, 1) for images (the attention's)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x: Tensor) -> Tensor:
        # = F.normalize(x, dim=1) * scale * gamma (eps 1e-12 on the norm). A sum of squares over
        # dim 1 is a vectorised reduction; CPU vector_norm over that dim is ~20x slower.
        inv = x.square().sum(dim=1, keepdim=True).clamp_min_(1e-24).rsqrt_()
        return (x * inv).mul_(self.gamma.reshape(-1, *(1,) * (x.dim() - 2)) * self.scale)


# PyTorch's CPU heuristic sends a float32 Conv3d at batch 1 to its im2col kernel unless N*C*T*H is
# large, which narrow layers (the small preset) are not: oneDNN is 7-60x faster on those shapes.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")


def _conv3d(conv: nn.Conv3d, x: Tensor) -> Tensor:
    if _ONEDNN and x.is_cpu and x.dtype == torch.float32:
        return torch.mkldnn_convolution(x.contiguous(), conv.weight, conv.bias, conv.padding,  # type: ignore[arg-type]
                                        conv.stride, conv.dilation, conv.groups)
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _per_frame(fn: nn.Module, x: Tensor) -> Tensor:
    """A 2-D module applied to every frame of [B, C, T, H, W] (frames folded into the batch)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2).contiguous()


class ResidualBlock(nn.Module):
    """[RMS, SiLU, conv 3^3, RMS, SiLU, dropout, conv 3^3] + shortcut (1^3 conv if widths differ)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Index 5 is Wan's Dropout(0.0); an Identity keeps the key indices (residual.{0,2,3,6}).
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, (3, 3, 3)),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, (3, 3, 3)))
        self.shortcut = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x), inplace=True), state)
        h = conv2(F.silu(norm2(h), inplace=True), state)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (mid blocks only)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        # The 1x1 convs are linear maps over channels; q, k, v are the three channel thirds.
        q, k, v = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias).chunk(3, dim=-1)
        out = F.linear(F.scaled_dot_product_attention(q, k, v), self.proj.weight.flatten(1), self.proj.bias)
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Downsample(nn.Module):
    """x1/2 in space (zero-pad right/bottom, 3x3 conv stride 2), optionally x1/2 in time after it."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.temporal = temporal
        self.slot = -1  # its index in a state's `past`, if temporal (see _number_slots)
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        x = _per_frame(self.resample, x)
        return self._downsample_time(x, state) if self.temporal else x

    def _downsample_time(self, x: Tensor, state: _StreamState | None) -> Tensor:
        # The stream's first frame passes through; output j > 0 is the conv over frames 2j-2..2j,
        # so a later chunk (an even number of frames) needs just the previous chunk's last frame.
        past = None if state is None or not state.started else state.past[self.slot]
        first = past is None
        frames = x if past is None else torch.cat([past, x], dim=2)
        if state is not None:
            state.past[self.slot] = frames[:, :, -1:].clone()
        parts = [x[:, :, :1]] if first else []
        if frames.shape[2] >= 3:
            parts.append(_conv3d(self.time_conv, frames))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class Upsample(nn.Module):
    """x2 in space (nearest, then a 3x3 conv halving the channels), optionally x2 in time first."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.temporal = temporal
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        if self.temporal:
            x = self._upsample_time(x, state)
        return _per_frame(self.resample, x)

    def _upsample_time(self, x: Tensor, state: _StreamState | None) -> Tensor:
        # Wan's 'Rep': the stream's first frame skips the time conv, which sees the later frames
        # as a fresh stream (zeros in front, not frame 0). Each of those frames becomes two.
        first = state is None or not state.started
        rest = x[:, :, 1:] if first else x
        if rest.shape[2] == 0:
            return x
        y = self.time_conv(rest, state)
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return torch.cat([x[:, :, :1], y], dim=2) if first else y


def _number_slots(root: nn.Module) -> int:
    """Give each layer with temporal memory under `root` its state slot; returns how many."""
    layers = [m for m in root.modules() if (isinstance(m, CausalConv3d) and m.past_frames)
              or (isinstance(m, Downsample) and m.temporal)]
    for i, m in enumerate(layers):
        m.slot = i
    return len(layers)


def _run_head(head: nn.Sequential, x: Tensor, state: _StreamState | None) -> Tensor:
    norm, _, conv = head
    return conv(F.silu(norm(x), inplace=True), state)


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], (3, 3, 3))
        layers: list[nn.Module] = []
        for i, cout in enumerate(dims[1:]):
            for j in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(dims[i] if j == 0 else cout, cout))
            if i < len(cfg.temporal_downsample):
                layers.append(Downsample(cout, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        # mu and log-variance, z_dim channels each
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, 2 * cfg.z_dim, (3, 3, 3)))
        self.num_slots = _number_slots(self)

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        x = self.conv1(x, state)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, state)
        return _run_head(self.head, x, state)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3))
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, cout in enumerate(dims[1:]):
            cin = dims[i] // 2 if i > 0 else dims[i]  # every upsample halved the channels
            for j in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin if j == 0 else cout, cout))
            if i < len(temporal_upsample):
                layers.append(Upsample(cout, temporal=temporal_upsample[i]))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, (3, 3, 3)))
        self.num_slots = _number_slots(self)

    def forward(self, x: Tensor, state: _StreamState | None = None) -> Tensor:
        x = self.conv1(x, state)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, state)
        return _run_head(self.head, x, state)


# -- the VAE -------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1's video VAE behind the `StreamingVAE` interface (see `vae.py`).

    Pixels [B, 3, T, H, W] in [-1, 1], H and W multiples of 8; latents [B, 16, n, H/8, W/8] in the
    DiT's space. Build with `WanVAE.build`; a bare `WanVAE(cfg)` has PyTorch's default init.
    """

    kind: ClassVar[str] = "wan"
    temporal_stride: ClassVar[int] = 4
    spatial_stride: ClassVar[int] = 8

    latent_mean: Tensor
    latent_std: Tensor

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.z_dim = cfg.z_dim
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1))
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1))
        self.decoder = Decoder3d(cfg)
        # Not in Wan's state dict; `load_weights` re-creates them on the weights' device.
        self.register_buffer("latent_mean", _channel_vector(cfg.latent_mean), persistent=False)
        self.register_buffer("latent_std", _channel_vector(cfg.latent_std), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    # -- streaming -----------------------------------------------------------------------------

    def encode_state(self) -> WanEncodeState:
        return WanEncodeState(past=[None] * self.encoder.num_slots)

    def decode_state(self) -> WanDecodeState:
        return WanDecodeState(past=[None] * self.decoder.num_slots)

    @torch.no_grad()
    def encode_chunk(self, frames: Tensor, state: WanEncodeState) -> Tensor:
        """The next frames of a session -> its next latents: 1 + 4k frames -> 1 + k latents on the
        first call of `state`, 4k frames -> k latents after that (k >= 1)."""
        _check_state(state, WanEncodeState, self.encoder.num_slots)
        self._check_pixels(frames)
        t = frames.shape[2]
        if not state.started and (t - 1) % 4:
            raise ValueError(f"the first encode_chunk of a stream takes 1 + 4k frames (1, 5, 9, ...), "
                             f"got {t}")
        if state.started and t % 4:
            raise ValueError(f"encode_chunk after the first takes 4k frames (4, 8, ...), got {t}")
        _check_shape(state, frames)
        latents = self._encode(frames, state)
        state.started = True
        return latents

    @torch.no_grad()
    def decode_chunk(self, latents: Tensor, state: WanDecodeState) -> Tensor:
        """The next n >= 1 latents of a session -> its next frames: 1 + 4(n - 1) on the first call
        of `state`, 4n after that. Any grouping gives the frames of one latent at a time."""
        _check_state(state, WanDecodeState, self.decoder.num_slots)
        self._check_latents(latents)
        _check_shape(state, latents)
        frames = self._decode(latents, state)
        state.started = True
        return frames

    # -- whole sequences ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """1 + 4k frames -> 1 + k latents, every temporal layer run once over the whole clip."""
        self._check_pixels(video)
        if (video.shape[2] - 1) % 4:
            raise ValueError(f"encode takes 1 + 4k frames (1, 5, 9, ...), got {video.shape[2]}")
        return self._encode(video, None)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """n latents -> 1 + 4(n - 1) frames, every temporal layer run once over the whole clip."""
        self._check_latents(latents)
        return self._decode(latents, None)

    def _encode(self, x: Tensor, state: WanEncodeState | None) -> Tensor:
        h = self.encoder(x.to(self.dtype), state)
        # conv1 makes [mu, log-variance]; only mu is used, so only its half is computed.
        w, b = self.conv1.weight[: self.z_dim], self.conv1.bias[: self.z_dim]  # type: ignore[index]
        mu = F.conv3d(h, w, b)
        return (mu - self.latent_mean) / self.latent_std if self.config.scale_on_encode else mu

    def _decode(self, z: Tensor, state: WanDecodeState | None) -> Tensor:
        x = self.conv2(z.to(self.dtype) * self.latent_std + self.latent_mean)
        return self.decoder(x, state).clamp_(-1.0, 1.0)

    def _check_pixels(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[2] < 1:
            raise ValueError(f"pixels must be [B, 3, T >= 1, H, W], got {tuple(x.shape)}")
        if x.shape[3] % self.spatial_stride or x.shape[4] % self.spatial_stride:
            raise ValueError(f"pixel height and width must be multiples of {self.spatial_stride}, "
                             f"got {x.shape[3]}x{x.shape[4]}")

    def _check_latents(self, z: Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.z_dim or z.shape[2] < 1:
            raise ValueError(f"latents must be [B, {self.z_dim}, n >= 1, h, w], got {tuple(z.shape)}")

    # -- weights ----------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: WanVAEConfig,
        *,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> WanVAE:
        """A VAE in eval mode without gradients: `checkpoint`'s weights (strictly), or a seeded
        random init. Built on the meta device, so the weights are materialised once."""
        with torch.device("meta"):
            vae = cls(cfg)
        if checkpoint is None:
            weights, source = random_wan_vae_weights(vae, seed), f"random weights (seed {seed})"
        else:
            weights, source = read_state_dict(checkpoint), str(checkpoint)
        vae.load_weights(weights, device=device, dtype=dtype, source=source)
        return vae.eval().requires_grad_(False)

    def load_weights(
        self,
        weights: Mapping[str, Tensor],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "state dict",
    ) -> None:
        """Assign Wan-named `weights` (cast to `dtype` on `device`); `CheckpointError` unless
        their keys and shapes are exactly this model's."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        problem = key_mismatch(expected, weights)
        if problem:
            raise CheckpointError(f"{source}: does not fit the Wan VAE ({self.config.name}): {problem}")
        self.load_state_dict({k: weights[k].to(device=device, dtype=dtype) for k in expected},
                             strict=True, assign=True)
        self.latent_mean = _channel_vector(self.config.latent_mean, device=device, dtype=dtype)
        self.latent_std = _channel_vector(self.config.latent_std, device=device, dtype=dtype)


def random_wan_vae_weights(vae: WanVAE, seed: int = 0) -> dict[str, Tensor]:
    """Seeded float32 CPU weights for `vae`'s keys. Convs get std 1/sqrt(fan_in) and small biases,
    norms a gain of 1; each residual branch's last conv and the decoder's output conv get half that
    scale, so activations stay O(1) through all blocks and few decoded pixels hit the clamp."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, held in vae.state_dict().items():
        shape = held.shape
        if key.endswith(".gamma"):
            out[key] = torch.ones(shape, device="cpu")
        elif key.endswith(".bias"):
            out[key] = 0.02 * torch.randn(shape, generator=g, device="cpu")
        else:
            gain = 0.5 if key.endswith(("residual.6.weight", "decoder.head.2.weight")) else 1.0
            std = gain / math.sqrt(math.prod(shape[1:]))
            out[key] = torch.randn(shape, generator=g, device="cpu") * std
    return out


def write_wan_vae_checkpoint(vae: WanVAE, path: str | Path) -> Path:
    """Write `vae`'s weights as Wan ships them: `torch.save(state_dict)` for `.pth`/`.pt`, or a
    safetensors file for `.safetensors`."""
    return write_state_dict(vae.state_dict(), path)


# -- helpers ---------------------------------------------------------------------------------------


def _channel_vector(values: tuple[float, ...], **kw: object) -> Tensor:
    return torch.tensor(values, **kw).view(1, -1, 1, 1, 1)  # type: ignore[arg-type]


def _check_state(state: object, kind: type[_StreamState], slots: int) -> None:
    if not isinstance(state, kind):
        raise TypeError(f"expected a {kind.__name__} (from this VAE's "
                        f"{'encode' if kind is WanEncodeState else 'decode'}_state()), "
                        f"got {type(state).__name__}")
    if len(state.past) != slots:
        raise ValueError(f"{kind.__name__} has {len(state.past)} slots, this VAE needs {slots}: "
                         f"it belongs to a VAE of another shape")


def _check_shape(state: _StreamState, x: Tensor) -> None:
    """A stream's chunks keep its batch size and frame size (the cached frames have them)."""
    shape = (x.shape[0], x.shape[3], x.shape[4])
    if state.shape is None:
        state.shape = shape
    elif state.shape != shape:
        raise ValueError(f"chunk has batch {shape[0]} and size {shape[1]}x{shape[2]}, but this stream "
                         f"has batch {state.shape[0]} and size {state.shape[1]}x{state.shape[2]}")


__all__ = [
    "WAN_VAE_PRESETS",
    "WanDecodeState",
    "WanEncodeState",
    "WanVAE",
    "WanVAEConfig",
    "random_wan_vae_weights",
    "write_wan_vae_checkpoint",
]
