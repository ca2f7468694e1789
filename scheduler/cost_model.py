"""How long a micro-batch takes, predicted from its shape alone and corrected by measurements.

The scheduler never touches tensors, yet it must decide batch sizes, admissions and deadlines
before anything runs. It therefore needs a cheap, honest forward-time model:

    forward_s = scale · (overhead_s + flops / (peak_flops · efficiency(T)))
    efficiency(T) = T / (T + half_tokens),  T = batch size × tokens per item
    codec_s = decode_scale · (decode_s · decoded latent frames + encode_s · encoded latent frames)

FLOPs come from the DiT's shape (performance.md §2.3), so the model extrapolates across batch size,
block length, KV length and resolution. The efficiency curve captures why small forwards (one
1560-token latent frame) reach only a fraction of peak while batching several items recovers it —
the effect StreamDiffusionV2's "stream batch" exploits. `flops / efficiency` simplifies to
`flops_per_token · (T + half_tokens)`: half_tokens is the extra work-equivalent tokens every forward
pays, so per-item cost falls as the batch grows.

`fit` calibrates peak_flops, half_tokens and overhead_s from measured forwards; `observe` keeps a
running correction (`scale`) so a drifting GPU (clocks, contention) does not invalidate deadlines.
Presets are derived from StreamDiffusionV2's published single-H100 throughput (see `_build_presets`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from rollcast.scheduler.work import BatchShape

if TYPE_CHECKING:  # importing it at run time would pull in torch via rollcast.workers
    from rollcast.workers.model_config import ModelConfig

FORMAT = "rollcast-cost-model/1"
RATIO_MIN, RATIO_MAX = 0.1, 10.0  # one outlier measurement moves scale by at most alpha·10

# Wan VAE FLOPs per latent frame (performance.md §2.6): decoder 13.55 TF, encoder 8.05 TF at 480p
# (8.88 / 5.27 TF at 512², the same ratio). A measured codec total is split in this ratio.
_WAN_DECODE_TF, _WAN_ENCODE_TF = 13.55, 8.05

_FLOAT_FIELDS = (
    "linear_flops_per_token", "attn_flops_per_pair", "peak_flops", "half_tokens", "overhead_s",
    "decode_s_per_latent_frame", "encode_s_per_latent_frame", "scale", "decode_scale",
)


def flop_coefficients(dim: int, ffn_dim: int, num_layers: int) -> tuple[float, float]:
    """(linear FLOPs per token, attention-core FLOPs per (query, key) pair) of a Wan DiT forward.

    Linear: per layer self-attention QKVO (8d²) + cross-attention Q, O (4d²) + FFN (4·d·ffn); these
    are FLOPs already (2 per MAC). Cross-attention K/V on the text are cached per prompt, so they
    are not per-token work. Attention core: QKᵀ and PV, 2 MACs·d each per pair per layer = 4·d·L.
    """
    linear = float(num_layers * (12 * dim * dim + 4 * dim * ffn_dim))
    pair = float(4 * dim * num_layers)
    return linear, pair


@dataclass(slots=True)
class CostModel:
    """Forward and codec time of a micro-batch; see the module docstring for the formula."""

    name: str
    linear_flops_per_token: float
    attn_flops_per_pair: float
    text_len: int  # cross-attention keys per query token
    peak_flops: float  # effective FLOP/s of large forwards
    half_tokens: float  # tokens per forward at which efficiency is half of peak
    overhead_s: float  # fixed time per forward (launches, Python)
    decode_s_per_latent_frame: float
    encode_s_per_latent_frame: float
    scale: float = 1.0  # online correction of the forward part
    decode_scale: float = 1.0  # online correction of the codec part

    def __post_init__(self) -> None:
        _validate(self)

    # ----------------------------------------------------------------- prediction (hot path)

    def efficiency(self, tokens: float) -> float:
        """Fraction of peak_flops a forward over `tokens` tokens (all items together) reaches."""
        return tokens / (tokens + self.half_tokens) if tokens > 0 else 0.0

    def flops(self, batch: BatchShape) -> float:
        """FLOPs of one forward of the micro-batch (linear + self-attention + cross-attention)."""
        shape = batch.shape
        per_token = self.linear_flops_per_token + self.attn_flops_per_pair * (shape.kv_tokens + self.text_len)
        return batch.size * shape.tokens * per_token

    def base_forward_s(self, batch: BatchShape) -> float:
        """Forward time before the online `scale` correction; 0 for an empty batch."""
        shape = batch.shape
        total = batch.size * shape.tokens
        if total <= 0:
            return 0.0
        per_token = self.linear_flops_per_token + self.attn_flops_per_pair * (shape.kv_tokens + self.text_len)
        # flops / (peak · T/(T+h)) = per_token · T · (T+h)/T / peak = per_token · (T+h) / peak
        return self.overhead_s + per_token * (total + self.half_tokens) / self.peak_flops

    def forward_s(self, batch: BatchShape) -> float:
        return self.scale * self.base_forward_s(batch)

    def codec_s(self, batch: BatchShape) -> float:
        """VAE time attached to the micro-batch: decode of finished blocks, encode of v2v input."""
        return self.decode_scale * (
            self.decode_s_per_latent_frame * batch.decode_latent_frames
            + self.encode_s_per_latent_frame * batch.encode_latent_frames
        )

    def predict(self, batch: BatchShape) -> float:
        """Seconds from submitting the micro-batch to its frames being ready."""
        return self.forward_s(batch) + self.codec_s(batch)

    # ----------------------------------------------------------------- online correction

    def observe(self, batch: BatchShape, seconds: float, *, alpha: float = 0.1) -> float:
        """Fold one measured micro-batch time into `scale`; returns the (clamped) ratio used.

        The predicted codec part is subtracted first, so a batch that also decoded corrects only
        the forward model. The ratio is clamped to [0.1, 10] so one stalled or bogus measurement
        cannot wreck predictions; an EWMA with weight `alpha` then tracks slow drift.
        """
        _check_alpha(alpha)
        _check_seconds(seconds)
        base = self.base_forward_s(batch)
        if base <= 0.0:
            return 1.0
        ratio = _clamp((seconds - self.codec_s(batch)) / base)
        self.scale = (1.0 - alpha) * self.scale + alpha * ratio
        return ratio

    def observe_codec(self, latent_frames_decoded: int, seconds: float, *, alpha: float = 0.1) -> float:
        """Fold a separately timed decode into `decode_scale`; returns the (clamped) ratio used."""
        _check_alpha(alpha)
        _check_seconds(seconds)
        base = self.decode_s_per_latent_frame * latent_frames_decoded
        if base <= 0.0:
            return 1.0
        ratio = _clamp(seconds / base)
        self.decode_scale = (1.0 - alpha) * self.decode_scale + alpha * ratio
        return ratio

    # ----------------------------------------------------------------- construction and fitting

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        *,
        name: str,
        peak_flops: float,
        half_tokens: float,
        overhead_s: float,
        decode_s_per_latent_frame: float = 0.0,
        encode_s_per_latent_frame: float = 0.0,
    ) -> CostModel:
        """A cost model whose FLOP coefficients come from the DiT's configuration."""
        linear, pair = flop_coefficients(config.dim, config.ffn_dim, config.num_layers)
        return cls(
            name=name, linear_flops_per_token=linear, attn_flops_per_pair=pair, text_len=config.text_len,
            peak_flops=peak_flops, half_tokens=half_tokens, overhead_s=overhead_s,
            decode_s_per_latent_frame=decode_s_per_latent_frame,
            encode_s_per_latent_frame=encode_s_per_latent_frame,
        )

    def fit(
        self, samples: Sequence[tuple[BatchShape, float]], *, overhead_s: float | None = None
    ) -> CostModel:
        """A copy with peak_flops, half_tokens and overhead_s fitted to measured micro-batch times.

        Each sample's predicted codec part is subtracted, so samples with decode/encode work are
        usable. Because per_token·(T+h)/peak = flops·(1/peak) + per_token·(h/peak), the model is
        linear in (overhead, 1/peak, h/peak); this solves that least-squares problem exactly (no grid
        over h), in relative error so short and long forwards count alike, with overhead >= 0,
        peak > 0 and h >= 0. Overhead and half_tokens are only separable when the samples differ in
        FLOPs per token (KV length, resolution); when they do not, overhead_s keeps its current value
        (or the one given), and when all samples also have the same token count, so does half_tokens.
        `scale` is reset to 1.
        """
        if overhead_s is not None and not (math.isfinite(overhead_s) and overhead_s >= 0):
            raise ValueError(f"overhead_s must be a finite number >= 0, got {overhead_s}")
        rows = [self._fit_row(batch, seconds) for batch, seconds in samples]
        if len(rows) < 2:
            raise ValueError(f"fit needs at least 2 samples with a non-empty forward, got {len(rows)}")
        flops, per_token, fwd = (np.array(col, dtype=float) for col in zip(*rows, strict=True))
        # Rows divided by the measured time: minimise the sum of squared relative errors.
        weight = 1.0 / fwd
        overhead = overhead_s
        if overhead is None and _rank([weight, flops * weight, per_token * weight]) == 3:
            coef = _nonneg_lstsq(np.stack([weight, flops * weight, per_token * weight], 1), fwd * weight, 1)
            overhead, inv_peak, h_over_peak = coef
        else:
            overhead = self.overhead_s if overhead is None else overhead
            target = (fwd - overhead) * weight
            if _rank([flops * weight, per_token * weight]) == 2:
                design = np.stack([flops * weight, per_token * weight], 1)
                inv_peak, h_over_peak = _nonneg_lstsq(design, target, 0)
            else:  # peak and half_tokens inseparable: keep half_tokens, fit the slope only
                work = (flops + self.half_tokens * per_token) * weight
                (inv_peak,) = _nonneg_lstsq(work[:, None], target, 0)
                h_over_peak = self.half_tokens * inv_peak
        return dataclasses.replace(
            self, peak_flops=1.0 / float(inv_peak), half_tokens=float(h_over_peak / inv_peak),
            overhead_s=float(overhead), scale=1.0,
        )

    def _fit_row(self, batch: BatchShape, seconds: float) -> tuple[float, float, float]:
        """(flops, flops per token, measured forward seconds) of one sample, checked."""
        _check_seconds(seconds)
        tokens = batch.size * batch.shape.tokens
        if tokens <= 0:
            raise ValueError(f"fit sample {batch} has no tokens")
        fwd = seconds - self.codec_s(batch)
        if fwd <= 0:
            raise ValueError(f"fit sample {batch}: {seconds} s is not more than its predicted codec time")
        flops = self.flops(batch)
        return flops, flops / tokens, fwd

    def fit_codec(
        self,
        decode_samples: Sequence[tuple[int, float]] = (),
        encode_samples: Sequence[tuple[int, float]] = (),
    ) -> CostModel:
        """A copy with per-latent-frame decode/encode seconds fitted to (latent frames, seconds).

        A codec call's time is proportional to the frames it processes (its cost lives at pixel
        resolution, performance.md §2.6), so each is a one-parameter fit through the origin, in
        relative error. A side with no samples keeps its value; `decode_scale` is reset to 1.
        """
        decode = _per_frame(decode_samples, "decode")
        encode = _per_frame(encode_samples, "encode")
        return dataclasses.replace(
            self,
            decode_s_per_latent_frame=self.decode_s_per_latent_frame if decode is None else decode,
            encode_s_per_latent_frame=self.encode_s_per_latent_frame if encode is None else encode,
            decode_scale=1.0,
        )

    # ----------------------------------------------------------------- presets and files

    @classmethod
    def preset(cls, name: str) -> CostModel:
        """A fresh copy of a preset (copies, because observe() mutates the model)."""
        try:
            return dataclasses.replace(COST_PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown cost model preset {name!r}; presets: {sorted(COST_PRESETS)}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """Inverse of to_dict; raises ValueError saying what is missing or wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        kwargs = {n: data[n] for n in names if n in data}
        if not isinstance(kwargs["name"], str):
            raise ValueError(f"name must be a string, got {kwargs['name']!r}")
        if not _is_int(kwargs["text_len"]):
            raise ValueError(f"text_len must be an integer, got {kwargs['text_len']!r}")
        for n in _FLOAT_FIELDS:
            if n in kwargs and not _is_number(kwargs[n]):
                raise ValueError(f"{n} must be a number, got {kwargs[n]!r}")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a file written by save(); any problem is a ValueError naming the file."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cost model file {str(path)!r}: cannot read it ({e.strerror or e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"cost model file {str(path)!r}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"cost model file {str(path)!r}: {e}") from None


def resolve(spec: str | Path | CostModel) -> CostModel:
    """A cost model from a preset name, a JSON file written by save(), or a model (copied)."""
    if isinstance(spec, CostModel):
        return dataclasses.replace(spec)
    if isinstance(spec, str) and spec in COST_PRESETS:
        return CostModel.preset(spec)
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return CostModel.load(path)
    raise ValueError(f"{str(spec)!r} is neither a cost model preset ({sorted(COST_PRESETS)}) nor a file")


# --------------------------------------------------------------------- helpers


def _validate(m: CostModel) -> None:
    for n in _FLOAT_FIELDS:
        value = getattr(m, n)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"cost model {m.name!r}: {n} must be a finite number >= 0, got {value!r}")
    for n in ("peak_flops", "scale", "decode_scale"):
        if getattr(m, n) <= 0:
            raise ValueError(f"cost model {m.name!r}: {n} must be > 0, got {getattr(m, n)!r}")
    if not _is_int(m.text_len) or m.text_len < 0:
        raise ValueError(f"cost model {m.name!r}: text_len must be an integer >= 0, got {m.text_len!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _clamp(ratio: float) -> float:
    if math.isnan(ratio):
        return 1.0
    return min(max(ratio, RATIO_MIN), RATIO_MAX)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")


def _check_seconds(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"measured time must be a finite number of seconds >= 0, got {seconds}")


def _per_frame(samples: Sequence[tuple[int, float]], what: str) -> float | None:
    """Least-squares seconds per latent frame through the origin, in relative error."""
    ratios = []
    for frames, seconds in samples:
        _check_seconds(seconds)
        if frames <= 0 or seconds <= 0:
            raise ValueError(f"{what} sample ({frames} frames, {seconds} s) needs frames > 0 and time > 0")
        ratios.append(frames / seconds)
    if not ratios:
        return None
    # minimise Σ (s·n/y − 1)² over s  ⇒  s = Σ r / Σ r², r = n/y
    return sum(ratios) / sum(r * r for r in ratios)


def _rank(columns: list[np.ndarray]) -> int:
    design = np.stack([c / (np.abs(c).max() or 1.0) for c in columns], 1)
    return int(np.linalg.matrix_rank(design, tol=1e-9 * max(design.shape)))


def _nonneg_lstsq(design: np.ndarray, target: np.ndarray, required: int) -> list[float]:
    """Least squares with every coefficient >= 0 and column `required` > 0, solved exactly.

    The constrained minimum of a convex quadratic is the unconstrained minimum over its own support,
    so trying every support (at most 4 here) and keeping the best feasible solution is exact.
    """
    n = design.shape[1]
    norms = np.abs(design).max(axis=0)
    norms[norms == 0] = 1.0
    scaled = design / norms
    best: list[float] | None = None
    best_err = math.inf
    for support in itertools.product((True, False), repeat=n):
        idx = [i for i in range(n) if support[i]]
        if not support[required] or np.linalg.matrix_rank(scaled[:, idx]) < len(idx):
            continue
        sol = np.linalg.lstsq(scaled[:, idx], target, rcond=None)[0]
        if np.any(sol < 0) or sol[idx.index(required)] <= 0:
            continue
        err = float(np.sum((scaled[:, idx] @ sol - target) ** 2))
        if err < best_err * (1 - 1e-12):  # ties keep the larger support, tried first
            coef = [0.0] * n
            for i, value in zip(idx, sol, strict=True):
                coef[i] = float(value / norms[i])
            best, best_err = coef, err
    if best is None:
        raise ValueError("measured forward times do not grow with FLOPs; cannot fit a positive peak")
    return best


# --------------------------------------------------------------------- presets

_WAN_1_3B = flop_coefficients(dim=1536, ffn_dim=8960, num_layers=30)  # ModelConfig "wan-1.3b"
_WAN_14B = flop_coefficients(dim=5120, ffn_dim=13824, num_layers=40)  # ModelConfig "wan-14b"
_TEXT_LEN = 512
_KV_FRAMES = 6  # StreamDiffusionV2 v2v: 1-latent-frame blocks, num_kv_cache 6 (incl. the block)
_FRAMES_PER_LATENT = 4  # video frames per latent frame in steady state
_PRESET_OVERHEAD_S = 0.002  # assumed; the published rows cannot separate it from half_tokens


def _derive(
    name: str,
    coefficients: tuple[float, float],
    tokens_per_frame: int,
    *,
    fps_1: float,
    fps_k_batched: float,
    k: int,
    fps_k_serial: float | None = None,
    codec_s: float | None = None,
) -> CostModel:
    """Solve a preset from published end-to-end FPS of a 1-latent-frame, 6-frame-KV v2v stream.

    Per latent frame (4 video frames): 1 step = fwd(1) + codec; k steps without stream batch
    = k·fwd(1) + codec, which pins codec = (k·t1 − t_serial)/(k − 1) (else `codec_s` is given);
    k steps with stream batch = fwd(k) + codec. Since fwd(B) = overhead + F1/peak · (B + h/N)
    (F1 = FLOPs of one item, N its tokens), fwd(k) − fwd(1) = (k − 1)·F1/peak gives peak, and
    fwd(1) = overhead + F1/peak · (1 + h/N) gives half_tokens h.
    """
    linear, pair = coefficients
    n = tokens_per_frame
    f1 = n * (linear + pair * (_KV_FRAMES * n + _TEXT_LEN))
    t1 = _FRAMES_PER_LATENT / fps_1
    if fps_k_serial is not None:
        codec_s = (k * t1 - _FRAMES_PER_LATENT / fps_k_serial) / (k - 1)
    if codec_s is None:
        raise ValueError(f"preset {name}: needs the serial k-step FPS or a codec time")
    fwd_1 = t1 - codec_s
    fwd_k = _FRAMES_PER_LATENT / fps_k_batched - codec_s
    item_s = (fwd_k - fwd_1) / (k - 1)  # F1 / peak
    decode_share = _WAN_DECODE_TF / (_WAN_DECODE_TF + _WAN_ENCODE_TF)
    return CostModel(
        name=name, linear_flops_per_token=linear, attn_flops_per_pair=pair, text_len=_TEXT_LEN,
        peak_flops=f1 / item_s, half_tokens=n * ((fwd_1 - _PRESET_OVERHEAD_S) / item_s - 1.0),
        overhead_s=_PRESET_OVERHEAD_S,
        decode_s_per_latent_frame=codec_s * decode_share,
        encode_s_per_latent_frame=codec_s * (1.0 - decode_share),
    )


def _build_presets() -> dict[str, CostModel]:
    """Presets from StreamDiffusionV2 (arXiv 2511.07399), 1× H100, bf16, Wan VAE encode + decode.

    Figures are performance.md §1.1 (Fig. 9 / Fig. 11, 1 GPU; Fig. 15 stream-batch ablation).
    Each preset reproduces the figures it is solved from exactly, the other 1-GPU rows within 2.5 %
    (tests/test_cost_model.py). Overhead is fixed at 2 ms in all of them.
    """
    # 1.3B 480p (1560 tokens/frame, F1 = 6.74 TF): 1 step 20.47 FPS → 195.4 ms; 4 steps serial
    # 10.86 → 368.3 ms; 4 steps stream batch 13.95 → 286.7 ms. ⇒ codec 137.8 ms (decode 86.4,
    # encode 51.3), fwd(1) 57.6 ms, fwd(4) 149.0 ms, F1/peak 30.4 ms ⇒ peak 221.4 TFLOP/s,
    # half_tokens 1291.
    m13_480 = _derive("h100-wan-1.3b-480p", _WAN_1_3B, 1560, fps_1=20.47, fps_k_batched=13.95, k=4,
                      fps_k_serial=10.86)
    codec_480 = m13_480.decode_s_per_latent_frame + m13_480.encode_s_per_latent_frame
    # 14B 480p (F1 = 49.91 TF), same VAE and resolution, so the 1.3B codec (137.8 ms): 1 step 12.68
    # FPS → 315.5 ms ⇒ fwd(1) 177.7 ms; 4 steps 5.28 FPS, taken as stream batch → 757.6 ms ⇒
    # fwd(4) 619.8 ms, F1/peak 147.4 ms ⇒ peak 338.7 TFLOP/s, half_tokens 300.
    m14_480 = _derive("h100-wan-14b-480p", _WAN_14B, 1560, fps_1=12.68, fps_k_batched=5.28, k=4,
                      codec_s=codec_480)
    # 1.3B 512² (1024 tokens/frame, F1 = 3.82 TF): 1 step 26.21 → 152.6 ms; 4 steps serial 12.43
    # → 321.8 ms; stream batch 19.43 → 205.9 ms ⇒ codec 96.2 ms (the rows pin it; pixel-scaling
    # the 480p codec would give 90.4 ms), fwd(1) 56.4 ms, fwd(4) 109.7 ms, F1/peak 17.8 ms ⇒
    # peak 215.0 TFLOP/s, half_tokens 2114.
    m13_512 = _derive("h100-wan-1.3b-512", _WAN_1_3B, 1024, fps_1=26.21, fps_k_batched=19.43, k=4,
                      fps_k_serial=12.43)
    codec_512 = m13_512.decode_s_per_latent_frame + m13_512.encode_s_per_latent_frame
    # 14B 512² (F1 = 30.07 TF), codec from the 1.3B 512² rows (96.2 ms): 1 step 18.71 → 213.8 ms
    # ⇒ fwd(1) 117.6 ms; 4 steps 8.26 (stream batch) → 484.3 ms ⇒ fwd(4) 388.1 ms, F1/peak
    # 90.2 ms ⇒ peak 333.5 TFLOP/s, half_tokens 289.
    m14_512 = _derive("h100-wan-14b-512", _WAN_14B, 1024, fps_1=18.71, fps_k_batched=8.26, k=4,
                      codec_s=codec_512)
    return {m.name: m for m in (m13_480, m14_480, m13_512, m14_512)}


# Read-only; CostModel.preset(name) hands out copies, since observe() mutates a model.
COST_PRESETS: Mapping[str, CostModel] = MappingProxyType(_build_presets())
