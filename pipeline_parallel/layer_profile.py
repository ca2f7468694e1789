"""Per-layer time and memory of the causal Wan DiT on one device: the block scheduler's input.

`measure_layer_profile` builds the model's pieces for real and times them at one forward shape
(`batch` stream-batch rows of one block at one resolution, attending over a full K/V cache).
All Wan blocks have the same shape, so only `timed_layers` blocks (2 by default) are built and
timed and their median is replicated to every layer: a 14B profile then needs two blocks' weights,
not forty. Embed (patch + time embedding) is the stage-0 extra, head + unpatchify the last
stage's. Self-attention is timed as a write of the block's K/V into a preallocated cache of
`kv_frames` frames plus SDPA over all of it, without RoPE (a few elementwise ops) and without a
validity mask (a full cache, the steady state).

Bytes per layer are analytic: one block's parameters plus its K/V cache for `batch` rows
(2 × kv_frames × tokens_per_frame × dim elements each); the per-prompt cross-attention K/V
(2 × text_len × dim per prompt) are not counted.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollcast.pipeline_parallel.partition import DeviceSpec, LayerCost
from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.model_config import ModelConfig

FORMAT = "rollcast-layer-profile/1"


@dataclass
class LayerProfile:
    config: str
    resolution: tuple[int, int]  # (width, height) in pixels
    batch: int  # stream-batch rows per forward
    layers: list[LayerCost]
    first_s: float  # stage-0 extra: patch + time embedding
    last_s: float  # last-stage extra: head + unpatchify
    device: str
    dtype: str = "float32"
    kv_frames: int = 0  # latent frames of K/V each query attended to (0: unknown)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, saved as is

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "config": self.config, "resolution": list(self.resolution),
            "batch": self.batch, "device": self.device, "dtype": self.dtype, "kv_frames": self.kv_frames,
            "first_s": self.first_s, "last_s": self.last_s,
            "layers": [{"time_s": c.time_s, "bytes": c.bytes} for c in self.layers], "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerProfile:
        """Inverse of to_dict; raises ValueError saying which key is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        res = _get(data, "resolution", list)
        if len(res) != 2 or not all(_is_int(v) and v > 0 for v in res):
            raise ValueError(f"resolution must be [width, height] positive integers, got {res!r}")
        rows = _get(data, "layers", list)
        if not rows:
            raise ValueError("layers must not be empty")
        layers = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"layers[{i}] must be an object, got {row!r}")
            t, b = _get(row, "time_s", float), _get(row, "bytes", int)
            if not (math.isfinite(t) and t >= 0) or b < 0:
                raise ValueError(f"layers[{i}]: time_s and bytes must be finite and >= 0, got {row!r}")
            layers.append(LayerCost(float(t), b))
        batch = _get(data, "batch", int)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        first_s, last_s = _get(data, "first_s", float), _get(data, "last_s", float)
        if not all(math.isfinite(v) and v >= 0 for v in (first_s, last_s)):
            raise ValueError(f"first_s and last_s must be finite and >= 0, got {first_s} and {last_s}")
        extra = data.get("extra", {})
        return cls(
            config=_get(data, "config", str), resolution=(res[0], res[1]), batch=batch, layers=layers,
            first_s=float(first_s), last_s=float(last_s), device=_get(data, "device", str),
            dtype=_get(data, "dtype", str), kv_frames=_get(data, "kv_frames", int),
            extra=extra if isinstance(extra, dict) else {},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LayerProfile:
        """Read a file written by save(); any problem is a ValueError naming the file."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"layer profile {str(path)!r}: cannot read it ({e.strerror or e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"layer profile {str(path)!r}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"layer profile {str(path)!r}: {e}") from None


def block_param_count(config: ModelConfig) -> int:
    """Parameters of one WanBlock, from the config alone (matches the module exactly)."""
    d, f = config.dim, config.ffn_dim
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, o linears + RMSNorm on q and k
    return 2 * attention + 2 * d + (d * f + f) + (f * d + d) + 6 * d  # norm3 affine, ffn, modulation


def layer_bytes(config: ModelConfig, *, kv_tokens: int, batch: int, dtype_bytes: int) -> int:
    """Weights of one block plus its self-attention K/V cache for `batch` rows."""
    return (block_param_count(config) + 2 * batch * kv_tokens * config.dim) * dtype_bytes


def measure_layer_profile(
    config: ModelConfig,
    resolution: tuple[int, int] = (832, 480),
    *,
    batch: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    kv_frames: int | None = None,
    timed_layers: int = 2,
) -> LayerProfile:
    """Time embed, `timed_layers` blocks and the head at one forward shape (see module docstring)."""
    if batch < 1 or repeats < 1 or timed_layers < 1:
        raise ValueError(f"batch, repeats and timed_layers must be >= 1, got {batch}, {repeats}, "
                         f"{timed_layers}")
    frames = config.frames_per_block
    kv_frames = kv_frames if kv_frames is not None else CachePolicy.preset("self-forcing").capacity_frames
    if kv_frames < frames:
        raise ValueError(f"kv_frames {kv_frames} is smaller than a block of {frames} frames")
    lh, lw = config.latent_hw(*resolution)
    tokens = config.tokens_per_frame(lh, lw)
    n_timed = min(timed_layers, config.num_layers)
    with torch.device(device):
        model = CausalWanModel(config, layers=range(n_timed)).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    heads, hd = config.num_heads, config.head_dim
    x = torch.randn(batch, config.in_dim, frames, lh, lw, generator=g, device=device)
    t = torch.full((batch, frames), 500.0, device=device)
    text_k, text_v = (torch.randn(batch, config.text_len, heads, hd, generator=g, device=device, dtype=dtype)
                      for _ in range(2))
    attend = _cache_attend(batch, kv_frames * tokens, heads, hd, dtype, device, g)

    with torch.inference_mode():
        first_s, (tok, e, e0, grid) = _time(lambda: model.embed(x, t), repeats, device)
        per_layer = [_time(lambda i=i: model.blocks[str(i)](tok, e0, text_k, text_v, i, attend),
                           repeats, device)[0] for i in model.layers]
        last_s, _ = _time(lambda: model.unpatchify(model.head(tok, e), grid), repeats, device)
    size = torch.empty((), dtype=dtype).element_size()
    cost = LayerCost(statistics.median(per_layer),
                     layer_bytes(config, kv_tokens=kv_frames * tokens, batch=batch, dtype_bytes=size))
    return LayerProfile(
        config=config.name, resolution=resolution, batch=batch, layers=[cost] * config.num_layers,
        first_s=first_s, last_s=last_s, device=device, dtype=str(dtype).removeprefix("torch."),
        kv_frames=kv_frames, extra={"timed_layers": n_timed, "layer_times_s": per_layer, "repeats": repeats},
    )


def devices_for(profile: LayerProfile, speeds: Sequence[float],
                memory: Sequence[int | None] | None = None) -> list[DeviceSpec]:
    """One DeviceSpec per stage: embed on stage 0 and head on the last as fixed time.

    The fixed times were measured on the profile's device (speed 1), so they too scale by 1/speed.
    """
    memory = list(memory) if memory is not None else [None] * len(speeds)
    if not speeds or len(memory) != len(speeds):
        raise ValueError(f"need one memory limit per stage: {len(speeds)} speeds, {len(memory)} limits")
    if any(not s > 0 for s in speeds):
        raise ValueError(f"speeds must be > 0, got {list(speeds)}")
    last = len(speeds) - 1
    fixed = [(profile.first_s if i == 0 else 0.0) + (profile.last_s if i == last else 0.0)
             for i in range(len(speeds))]
    return [DeviceSpec(name=f"stage{i}", speed=s, memory_bytes=m, fixed_s=f / s)
            for i, (s, m, f) in enumerate(zip(speeds, memory, fixed, strict=True))]


# --------------------------------------------------------------------- helpers


def _cache_attend(batch: int, kv_tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                  device: str, g: torch.Generator) -> Callable[[int, Tensor, Tensor, Tensor], Tensor]:
    """Write the block's K/V at the end of a full random cache, then attend over all of it."""
    kc, vc = (torch.randn(batch, kv_tokens, heads, head_dim, generator=g, device=device, dtype=dtype)
              for _ in range(2))

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = k.shape[1]
        kc[:, -n:] = k
        vc[:, -n:] = v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2))
        return out.transpose(1, 2)

    return attend


def _time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    """Fastest of `repeats` calls after one warm-up call, and the warm-up's result.

    The minimum, as StreamDiffusionV2's block scheduler keeps: contention and stalls only ever
    add time, and on a shared CPU they can dominate a median of a few runs.
    """
    cuda = torch.device(device).type == "cuda"
    result = fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)  # only CUDA runs asynchronously
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return min(samples), result


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get(data: dict[str, Any], key: str, kind: type) -> Any:
    """data[key], checked to be of `kind` (an int is accepted where a float is expected)."""
    if key not in data:
        raise ValueError(f"missing key {key!r}")
    value = data[key]
    ok = (_is_int(value) or isinstance(value, float)) if kind is float else (
        _is_int(value) if kind is int else isinstance(value, kind))
    if not ok:
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")
    return value
