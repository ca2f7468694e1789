"""The tiny VAE: a TAEHV-style autoencoder, key-compatible with madebyollin's `taew2_1` weights.

Architecture (TAEHV): 2-D convs applied to each frame, plus three kinds of temporal layer:
- `MemBlock`: 3 convs over [this frame's input, the previous frame's input] + skip + ReLU, i.e. a
  one-frame causal memory (zeros before the first frame);
- `TPool` (encoder): a 1x1 conv over `stride` consecutive frames stacked on channels;
- `TGrow` (decoder): a 1x1 conv to `stride` x channels, split into `stride` consecutive frames.
The encoder downsamples x8 in space (three stride-2 convs) and x4 in time (TPool strides 2, 2, 1);
the decoder mirrors it (nearest x2 upsampling, TGrow strides 1, 2, 2). So one latent is one group of
4 frames, and the decoder emits 4 raw frames per latent.

Frame alignment with Wan's causal rule (n latents <-> 1 + 4(n - 1) frames):
- decoder: like taehv's `frames_to_trim = 3`, the first 3 raw frames a decode state produces are
  dropped, so latent 0 yields 1 frame (raw frame 3) and latent i > 0 yields frames 4i - 3 .. 4i;
- encoder: the mirror image of that trim. The first frame of a stream is repeated 3 times in front
  of it, so the encoder's 4-frame groups are [f0, f0, f0, f0], [f1..f4], [f5..f8], ...: latent 0
  encodes frame 0 alone and latent i > 0 frames 4i - 3 .. 4i, exactly Wan's grouping. The 3 copies
  stand where the decoder's 3 trimmed start-up frames stand. (taehv's `encode_video` instead pads
  copies of the *last* frame at the end. For a single frame both give [f0, f0, f0, f0]; for longer
  inputs only front padding keeps Wan's grouping and can stream, since the frames after the first
  have not arrived yet when the first latent is due.)

Public I/O follows `vae.py`: pixels [B, 3, T, H, W] in [-1, 1], latents [B, 16, n, h, w] in the
DiT's space with no scaling (TAEHV was trained on raw DiT latents). Internally TAEHV works on
[0, 1] pixels laid out [B, T, C, H, W], folded to [B*T, C, H, W] so each conv sees every frame of a
chunk at once.

Streaming: the only state across calls is each MemBlock's input at the previous frame. The encoder
is fed 4k frames per call (after the first call's padding), so its TPool groups never straddle two
calls, and the decoder's TGrow only expands, so neither needs a partial-group buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollcast.workers.checkpoint import CheckpointError, key_mismatch, read_state_dict, write_state_dict

# Raw decoder frames dropped at the start of a stream (taehv's frames_to_trim = t_upscale - 1).
FRAMES_TO_TRIM = 3


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyVAEConfig:
    """Shape of a TAEHV-style autoencoder. `preset("full")` is taew2_1 exactly."""

    latent_channels: int = 16
    image_channels: int = 3
    encoder_width: int = 64
    # Decoder stage widths; the last one is also the width of the final pre-output conv (taehv's n_f[3]).
    decoder_widths: tuple[int, int, int] = (256, 128, 64)
    # Per stage: frames merged by the encoder's TPool / produced by the decoder's TGrow.
    encoder_time_strides: tuple[int, int, int] = (2, 2, 1)
    decoder_time_strides: tuple[int, int, int] = (1, 2, 2)
    blocks_per_stage: int = 3
    name: str = "custom"

    def __post_init__(self) -> None:
        for label, strides in (("encoder_time_strides", self.encoder_time_strides),
                               ("decoder_time_strides", self.decoder_time_strides)):
            if len(strides) != 3 or math.prod(strides) != 4 or min(strides) < 1:
                raise ValueError(f"{label} must be 3 positive strides whose product is 4 "
                                 f"(Wan's temporal stride), got {strides}")
        if len(self.decoder_widths) != 3 or min(self.decoder_widths) < 1:
            raise ValueError(f"decoder_widths must be 3 positive widths, got {self.decoder_widths}")
        if min(self.latent_channels, self.image_channels, self.encoder_width, self.blocks_per_stage) < 1:
            raise ValueError("latent_channels, image_channels, encoder_width and blocks_per_stage "
                             "must be positive")

    @classmethod
    def preset(cls, name: str) -> TinyVAEConfig:
        try:
            return TINY_VAE_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown tiny VAE preset {name!r}; choose one of "
                             f"{sorted(TINY_VAE_PRESETS)}") from None


TINY_VAE_PRESETS: dict[str, TinyVAEConfig] = {
    # madebyollin/taehv `taew2_1.pth`: 11,315,539 parameters in 128 tensors.
    "full": TinyVAEConfig(name="full"),
    # The repo's tiny CPU model: same layers and key names, ~1/5 of the widths. At 6 full-resolution
    # channels (the first choice) the trained decoder could not hold the shapes task's hues (colour
    # accuracy 0.65 after 1,500 steps vs 0.98 at these widths, docs/quality.md); at 128x128 these
    # widths also decode faster on CPU (3 latents: 50 ms vs 68 ms, 2 cores).
    "small": TinyVAEConfig(encoder_width=12, decoder_widths=(32, 16, 12), name="small"),
}


# -- layers (module names and parameter shapes follow taehv.py, so state-dict keys match) -----------


def _conv3x3(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A bias-free 1x1 conv as one batched matmul: the same sums, but oneDNN's 1x1 conv on CPU is up to
    10x slower at narrow widths and large frames (the small preset's full-resolution TGrow)."""
    n, c, h, w = x.shape
    y = torch.matmul(conv.weight.view(conv.out_channels, c), x.reshape(n, c, h * w))
    return y.view(n, conv.out_channels, h, w)


class Clamp(nn.Module):
    """Soft clamp of the decoder's input latents to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also sees the previous frame's input (`past`)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(n_in * 2, n_out), nn.ReLU(inplace=True),
                                  _conv3x3(n_out, n_out), nn.ReLU(inplace=True), _conv3x3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        # Current frame first, then memory: the channel order the taew2_1 weights expect.
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merges `stride` consecutive frames (stacked on channels, earliest first) into one."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # [B*T, C, H, W] with each row's frames contiguous and T % stride == 0 (the callers check).
        _, c, h, w = x.shape
        return _pointwise(self.conv, x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """Expands each frame into `stride` consecutive frames (channel block j -> frame j)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        return _pointwise(self.conv, x).reshape(-1, c, h, w)


def build_encoder(cfg: TinyVAEConfig) -> nn.Sequential:
    """taehv's encoder: encoder.0 conv, .2 TPool, .3 stride-2 conv, .4-.6 MemBlocks, ..., .17 conv."""
    w = cfg.encoder_width
    layers: list[nn.Module] = [_conv3x3(cfg.image_channels, w), nn.ReLU(inplace=True)]
    for stride in cfg.encoder_time_strides:
        layers += [TPool(w, stride), _conv3x3(w, w, stride=2, bias=False)]
        layers += [MemBlock(w, w) for _ in range(cfg.blocks_per_stage)]
    layers.append(_conv3x3(w, cfg.latent_channels))
    return nn.Sequential(*layers)


def build_decoder(cfg: TinyVAEConfig) -> nn.Sequential:
    """taehv's decoder: decoder.0 Clamp, .1 conv, .3-.5 MemBlocks, .6 Upsample, .7 TGrow, .8 conv, ..."""
    widths = cfg.decoder_widths
    layers: list[nn.Module] = [Clamp(), _conv3x3(cfg.latent_channels, widths[0]), nn.ReLU(inplace=True)]
    for stage, stride in enumerate(cfg.decoder_time_strides):
        w = widths[stage]
        w_next = widths[min(stage + 1, len(widths) - 1)]
        layers += [MemBlock(w, w) for _ in range(cfg.blocks_per_stage)]
        layers += [nn.Upsample(scale_factor=2), TGrow(w, stride), _conv3x3(w, w_next, bias=False)]
    layers += [nn.ReLU(inplace=True), _conv3x3(widths[-1], cfg.image_channels)]
    return nn.Sequential(*layers)


# -- running a layer stack ---------------------------------------------------------------------------


def _frames_per_row(x: Tensor, batch: int, layer: nn.Module) -> int:
    t = x.shape[0] // batch
    if isinstance(layer, TPool) and t % layer.stride:
        # Unreachable through the public API (it only feeds whole 4-frame groups); guards new callers.
        raise ValueError(f"TPool with stride {layer.stride} got {t} frames per row")
    return t


def run_sequence(layers: nn.Sequential, x: Tensor, batch: int) -> Tensor:
    """Whole-sequence pass: every frame through each layer at once; each MemBlock's memory is its
    input shifted one frame later in time, with zeros before the first frame (taehv's parallel mode).

    x: [batch*T, C, H, W] with each row's T frames contiguous."""
    for layer in layers:
        t = _frames_per_row(x, batch, layer)
        if isinstance(layer, MemBlock):
            seq = x.reshape(batch, t, *x.shape[1:])
            past = F.pad(seq, (0, 0, 0, 0, 0, 0, 1, 0))[:, :t].reshape(x.shape)
            x = layer(x, past)
        else:
            x = layer(x)
    return x


def run_chunk(layers: nn.Sequential, x: Tensor, batch: int, memory: list[Tensor | None]) -> Tensor:
    """Streaming pass over one chunk: like `run_sequence`, but each MemBlock's memory for the chunk's
    first frame is `memory[i]` (its input at the previous chunk's last frame; None = stream start).
    `memory` is updated in place with this chunk's last-frame inputs."""
    m = 0
    for layer in layers:
        t = _frames_per_row(x, batch, layer)
        if isinstance(layer, MemBlock):
            seq = x.reshape(batch, t, *x.shape[1:])
            prev = memory[m] if memory[m] is not None else torch.zeros_like(seq[:, 0])
            past = torch.cat([prev.unsqueeze(1), seq[:, :-1]], 1).reshape(x.shape)
            # Clone, so the state does not pin the whole chunk's activation.
            memory[m] = seq[:, -1].clone()
            m += 1
            x = layer(x, past)
        else:
            x = layer(x)
    return x


def _calibrate(layers: nn.Sequential, probe: Tensor, *, mean: float, std: float) -> None:
    """Rescale the stack's last conv so that, on `probe` (one row of frames), each output channel has
    the given mean and std."""
    out = layers[-1]
    out.bias.zero_()
    y = run_sequence(layers, probe, batch=1)
    y_mean, y_std = y.mean(dim=(0, 2, 3)), y.std(dim=(0, 2, 3)).clamp_min(1e-6)
    out.weight.mul_((std / y_std).view(-1, 1, 1, 1))
    out.bias.copy_(mean - y_mean * std / y_std)


def _count_memblocks(layers: nn.Sequential) -> int:
    return sum(isinstance(layer, MemBlock) for layer in layers)


# -- streaming state ---------------------------------------------------------------------------------


@dataclass
class TinyEncodeState:
    """One session's encoder memory: each encoder MemBlock's input at the last frame seen."""

    memory: list[Tensor | None]
    frames_in: int = 0  # video frames consumed (without the 3 start copies)
    latents_out: int = 0
    geometry: tuple[int, int, int] | None = field(default=None)  # (B, H, W) fixed by the first call

    @property
    def started(self) -> bool:
        return self.frames_in > 0


@dataclass
class TinyDecodeState:
    """One session's decoder memory: each decoder MemBlock's input at the last frame produced."""

    memory: list[Tensor | None]
    latents_in: int = 0
    frames_out: int = 0
    geometry: tuple[int, int, int] | None = field(default=None)  # (B, h, w) fixed by the first call

    @property
    def started(self) -> bool:
        return self.latents_in > 0


def _check_geometry(state: TinyEncodeState | TinyDecodeState, geometry: tuple[int, int, int],
                    what: str) -> None:
    if state.geometry is None:
        state.geometry = geometry
    elif state.geometry != geometry:
        raise ValueError(f"{what}: this state was started with (batch, height, width) = "
                         f"{state.geometry}, got {geometry}")


# -- the model ---------------------------------------------------------------------------------------


class TinyVAE(nn.Module):
    """TAEHV autoencoder behind the `StreamingVAE` interface (see `vae.py`)."""

    kind = "tiny"
    temporal_stride = 4
    spatial_stride = 8

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.z_dim = cfg.latent_channels
        self.encoder = build_encoder(cfg)
        self.decoder = build_decoder(cfg)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: TinyVAEConfig,
        *,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> TinyVAE:
        """A model of `cfg` on `device` in `dtype`: strictly loaded from a taew2_1-layout `.pth` /
        `.safetensors` file, or randomly initialised from `seed` (same seed -> same weights)."""
        with torch.device("meta"):
            vae = cls(cfg)
        if checkpoint is not None:
            sd = read_state_dict(checkpoint)
            check_tiny_state_dict(vae, sd, source=str(checkpoint))
            weights = {k: sd[k].to(device=device, dtype=dtype) for k in vae.state_dict()}
            vae.load_state_dict(weights, strict=True, assign=True)
        else:
            vae = vae.to_empty(device="cpu")
            vae.init_weights(torch.Generator().manual_seed(seed))
            vae = vae.to(device=device, dtype=dtype)
        return vae.eval().requires_grad_(False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Random weights that keep activations O(1), drawn on the CPU in fp32 (then copied), so a seed
        gives the same weights wherever the model then runs.

        He-normal for convs followed by ReLU; the last conv of each MemBlock's residual branch at
        1/sqrt(2·blocks) of that, so the residual stack grows slowly; TPool/TGrow variance-preserving
        without the ReLU gain. The two output convs are then calibrated on a fixed random probe:
        latents come out ~N(0, 1) per channel, and pixels ~0.5 ± 0.2 in [0, 1] (mid grey, rarely
        clamped). Without that, ReLU mean drift makes the output scale vary several-fold by seed."""
        residual_gain = 1 / math.sqrt(2 * self.config.blocks_per_stage)
        branch_ends = {m.conv[-1] for m in self.modules() if isinstance(m, MemBlock)}
        for module in self.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            gain = 1.0 if module.kernel_size == (1, 1) else math.sqrt(2)
            if module in branch_ends:
                gain *= residual_gain
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                * (gain / math.sqrt(fan_in)))
            if module.bias is not None:
                module.bias.zero_()
        # Probe: one 4-frame group of 32x32 pixels, and 2 latents (so the memory path is included).
        probe = torch.rand(4, self.config.image_channels, 32, 32, generator=generator)
        _calibrate(self.encoder, probe, mean=0.0, std=1.0)
        probe = torch.randn(2, self.z_dim, 4, 4, generator=generator)
        _calibrate(self.decoder, probe, mean=0.5, std=0.2)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    # -- layout conversion -------------------------------------------------------------------------

    def _pixels_in(self, video: Tensor, what: str) -> tuple[Tensor, int]:
        """[B, 3, T, H, W] in [-1, 1] -> [B, T, 3, H, W] in [0, 1] in the model's dtype."""
        if video.ndim != 5 or video.shape[1] != self.config.image_channels:
            raise ValueError(f"{what}: expected pixels [B, {self.config.image_channels}, T, H, W], "
                             f"got {tuple(video.shape)}")
        h, w = video.shape[-2:]
        if h % self.spatial_stride or w % self.spatial_stride or h == 0 or w == 0:
            raise ValueError(f"{what}: height and width must be positive multiples of "
                             f"{self.spatial_stride}, got {h}x{w}")
        x = video.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)
        return (x + 1) * 0.5, video.shape[2]

    def _latents_in(self, latents: Tensor, what: str) -> Tensor:
        """[B, z, n, h, w] -> [B*n, z, h, w] (rows' frames contiguous)."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"{what}: expected latents [B, {self.z_dim}, n, h, w], "
                             f"got {tuple(latents.shape)}")
        if latents.shape[2] < 1 or latents.shape[3] < 1 or latents.shape[4] < 1:
            raise ValueError(f"{what}: need at least 1 latent frame of positive size, "
                             f"got {tuple(latents.shape)}")
        x = latents.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)
        return x.reshape(-1, *x.shape[2:])

    @staticmethod
    def _latents_out(z: Tensor, batch: int) -> Tensor:
        """[B*n, z, h, w] -> contiguous [B, z, n, h, w] (callers may `.view` it)."""
        return z.reshape(batch, -1, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    @staticmethod
    def _pixels_out(x: Tensor, batch: int, trim: int) -> Tensor:
        """[B*T, 3, H, W] in ~[0, 1] -> contiguous [B, 3, T - trim, H, W] in [-1, 1]."""
        x = x.reshape(batch, -1, *x.shape[1:])[:, trim:]
        return (x * 2 - 1).clamp_(-1, 1).permute(0, 2, 1, 3, 4).contiguous()

    @staticmethod
    def _fold(x: Tensor) -> Tensor:
        """[B, T, C, H, W] -> [B*T, C, H, W]."""
        return x.reshape(-1, *x.shape[2:])

    def _front_pad(self, x: Tensor) -> Tensor:
        """Repeat the stream's first frame 3 times in front (see the module docstring)."""
        first = x[:, :1].expand(-1, self.temporal_stride - 1, -1, -1, -1)
        return torch.cat([first, x], 1)

    # -- encode ------------------------------------------------------------------------------------

    def encode_state(self) -> TinyEncodeState:
        return TinyEncodeState(memory=[None] * _count_memblocks(self.encoder))

    def decode_state(self) -> TinyDecodeState:
        return TinyDecodeState(memory=[None] * _count_memblocks(self.decoder))

    def _check_first_count(self, t: int, what: str) -> None:
        if t < 1 or (t - 1) % self.temporal_stride:
            raise ValueError(f"{what}: the first frames of a stream must number 1 + 4k (k >= 0), "
                             f"got {t}")

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Whole video [B, 3, 1 + 4k, H, W] -> latents [B, z, 1 + k, H/8, W/8] in one pass."""
        x, t = self._pixels_in(video, "encode")
        self._check_first_count(t, "encode")
        batch = x.shape[0]
        z = run_sequence(self.encoder, self._fold(self._front_pad(x)), batch)
        return self._latents_out(z, batch)

    @torch.no_grad()
    def encode_chunk(self, frames: Tensor, state: TinyEncodeState) -> Tensor:
        """Next frames of a stream -> their latents. The first call of `state` takes 1 + 4k frames
        and returns 1 + k latents; later calls take 4k frames (k >= 1) and return k."""
        x, t = self._pixels_in(frames, "encode_chunk")
        if not state.started:
            self._check_first_count(t, "encode_chunk")
            x = self._front_pad(x)
        elif t < 1 or t % self.temporal_stride:
            raise ValueError(f"encode_chunk: after the first call, frames must come in groups of "
                             f"{self.temporal_stride} (4k, k >= 1), got {t}")
        batch = x.shape[0]
        _check_geometry(state, (batch, *x.shape[-2:]), "encode_chunk")
        z = run_chunk(self.encoder, self._fold(x), batch, state.memory)
        state.frames_in += t
        out = self._latents_out(z, batch)
        state.latents_out += out.shape[2]
        return out

    # -- decode ------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Whole latent sequence [B, z, n, h, w] -> pixels [B, 3, 1 + 4(n - 1), 8h, 8w] in one pass."""
        batch = latents.shape[0]
        x = run_sequence(self.decoder, self._latents_in(latents, "decode"), batch)
        return self._pixels_out(x, batch, FRAMES_TO_TRIM)

    @torch.no_grad()
    def decode_chunk(self, latents: Tensor, state: TinyDecodeState) -> Tensor:
        """Next n >= 1 latents of a stream -> their frames: 4n, less the 3 start-up frames on the
        first call of `state` (so the stream's first latent yields 1 frame)."""
        z = self._latents_in(latents, "decode_chunk")
        batch = latents.shape[0]
        _check_geometry(state, (batch, *latents.shape[-2:]), "decode_chunk")
        trim = 0 if state.started else FRAMES_TO_TRIM
        x = run_chunk(self.decoder, z, batch, state.memory)
        out = self._pixels_out(x, batch, trim)
        state.latents_in += latents.shape[2]
        state.frames_out += out.shape[2]
        return out


# -- checkpoints -------------------------------------------------------------------------------------


def check_tiny_state_dict(vae: TinyVAE, sd: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Raise `CheckpointError` unless `sd` has exactly the model's keys and shapes."""
    problem = key_mismatch({k: v.shape for k, v in vae.state_dict().items()}, sd)
    if problem:
        raise CheckpointError(f"{source} does not fit the tiny VAE {vae.config.name!r}: {problem}")


def write_tiny_vae_checkpoint(vae: TinyVAE, path: str | Path) -> Path:
    """Write the weights as taehv publishes them: `.pth`/`.pt` (torch.save of the raw state dict)
    or `.safetensors`. Returns the path written."""
    return write_state_dict(vae.state_dict(), path)
