"""The causal (block-autoregressive) Wan2.1 text-to-video DiT.

Parameter names and shapes are exactly Wan2.1's (`wan/modules/model.py`), so checkpoints of
Self-Forcing, CausVid, StreamDiffusionV2, LongLive and Krea load unchanged. The causal variant
adds no parameters: it takes one timestep per latent frame and reads/writes a rolling KV cache.

Numerics (reference/model.md section 10): sinusoid cos-then-sin computed in float64; LayerNorm,
RMSNorm, modulation, RoPE and the residual stream in float32; linear layers and attention in
the parameter dtype (bf16 on GPU).

The float32 work between the matrix multiplies (adaLN modulation, gated residuals, q/k RMSNorm)
goes through the dispatchers of `rollcast.kernels`: fused Triton kernels on GPUs, and on CPU
their torch references, which are exactly the operations Wan does.

A block's self-attention is delegated to an `attend(layer, q, k, v)` callable: the serving path
passes `KVBatch.attend` (cache write + attention over sink and window); the test reference passes
a masked full-sequence attention. Everything else is shared, so the two can only differ in how
they attend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollcast.kernels import adaln_modulate, gated_residual, qk_norm_rope
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.prompt_kv import PromptBatch, PromptKV
from rollcast.workers.rope import Rope3D

AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """Wan's timestep embedding: cat(cos(t w), sin(t w)), w_i = 10000^(-i/half), in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(t, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


class RMSNorm(nn.Module):
    """Wan's RMSNorm (float32). Holds the q/k norm weights; the model itself normalises through
    `qk_norm_rope`, whose reference is this forward."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's `WanLayerNorm`)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return layer(x.to(layer.weight.dtype))


class AttentionProjections(nn.Module):
    """q, k, v, o linears with RMSNorm on q and k over the full dim (Wan's layer set)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _normed_heads(self, x: Tensor, norm: RMSNorm) -> Tensor:
        """RMSNorm over the full dim in float32, as [B, L, H, D] in the linear's dtype. RoPE is
        not fused here: its tables belong to the attend callable (`KVBatch.attend`), which
        rotates q and k itself."""
        if x.dim() == 2:  # a prompt's text [L, dim]; the kernel takes [B, L, dim]
            return self._normed_heads(x[None], norm)[0]
        return qk_norm_rope(x, norm.weight, None, None, num_heads=self.num_heads, eps=norm.eps)

    def project_q(self, x: Tensor) -> Tensor:
        return self._normed_heads(_linear(self.q, x), self.norm_q)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = _linear(self.v, x).unflatten(-1, (self.num_heads, -1))
        return self._normed_heads(_linear(self.k, x), self.norm_k), v

    def project_out(self, out: Tensor) -> Tensor:
        """[B, L, H, D] -> [B, L, dim] float32."""
        return _linear(self.o, out.flatten(2)).float()


class SelfAttention(AttentionProjections):
    def forward(self, x: Tensor, layer: int, attend: AttendFn) -> Tensor:
        k, v = self.project_kv(x)
        return self.project_out(attend(layer, self.project_q(x), k, v))


class CrossAttention(AttentionProjections):
    """Attention to the text rows (all of them, zero padding included, as Wan does)."""

    def text_kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """K/V of embedded text [..., L, dim] -> [..., L, H, D] each (cached per prompt)."""
        return self.project_kv(text)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self.project_q(x)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.project_out(out.transpose(1, 2))


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self, x: Tensor, e0: Tensor, text_k: Tensor, text_v: Tensor, layer: int, attend: AttendFn
    ) -> Tensor:
        """x: [B, F*T, dim] float32; e0: [B, F, 6, dim] float32 (per-frame modulation)."""
        mod = (self.modulation.float()[:, None] + e0).chunk(6, dim=2)  # each [B, F, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        y = adaln_modulate(x, shift_msa, scale_msa, self.norm1.eps)
        x = gated_residual(x, self.self_attn(y, layer, attend), gate_msa)
        x = x + self.cross_attn(self.norm3(x), text_k, text_v)
        # The FFN's input is rounded to its weights' dtype by the modulation itself.
        y = adaln_modulate(x, shift_mlp, scale_mlp, self.norm2.eps, out_dtype=self.ffn[0].weight.dtype)
        return gated_residual(x, self.ffn(y).float(), gate_mlp)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        out = math.prod(cfg.patch_size) * cfg.out_dim
        self.norm = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x: [B, F*T, dim]; e: [B, F, dim] (the time embedding, not its projection)."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).chunk(2, dim=2)
        return _linear(self.head, adaln_modulate(x, shift, scale, self.norm.eps)).float()


class CausalWanModel(nn.Module):
    """Wan2.1 T2V DiT with per-frame timesteps, run block by block through a KV cache.

    `layers` selects which transformer blocks this instance holds (a pipeline stage); numbering
    stays global, so `blocks.17.*` keeps its name whichever stage owns it.
    """

    def __init__(self, config: ModelConfig, layers: range | None = None) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        self.layers = layers if layers is not None else range(cfg.num_layers)
        if self.layers.step != 1 or self.layers.start < 0 or self.layers.stop > cfg.num_layers:
            raise ValueError(f"layers {self.layers} is not a contiguous range of 0..{cfg.num_layers}")
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        # A ModuleDict keyed by the global index gives the same state-dict names as Wan's
        # ModuleList (`blocks.{i}.…`) while letting a stage hold any contiguous range.
        self.blocks = nn.ModuleDict({str(i): WanBlock(cfg) for i in self.layers})
        self.head = Head(cfg)
        self.rope = Rope3D(cfg.head_dim)

    # -- pieces -----------------------------------------------------------------------------

    def embed(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int]]:
        """Latents [B, C, F, H, W] and timesteps [B, F] -> tokens, e, e0 and the token grid."""
        b, _, f, _, _ = x.shape
        if t.shape != (b, f):
            raise ValueError(f"timesteps must have shape {(b, f)} (one per latent frame), got "
                             f"{tuple(t.shape)}")
        w = self.patch_embedding.weight
        tokens = self.patch_embedding(x.to(w.dtype))
        grid = (tokens.shape[2], tokens.shape[3], tokens.shape[4])
        tokens = tokens.flatten(2).transpose(1, 2).float()
        sin = sinusoidal_embedding(self.config.freq_dim, t.flatten()).float()
        te = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sin.to(te)).float()  # [B*F, dim]
        e0 = self.time_projection(e.to(te)).float().unflatten(1, (6, -1))
        return tokens, e.view(b, f, -1), e0.view(b, f, 6, -1), grid

    def run_layers(self, x: Tensor, e0: Tensor, prompts: PromptBatch, attend: AttendFn) -> Tensor:
        for i in self.layers:
            k, v = prompts.layer(i)
            x = self.blocks[str(i)](x, e0, k, v, i, attend)
        return x

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, F*h*w, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw] (channel is the fastest index)."""
        b = out.shape[0]
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        out = out.view(b, f, h, w, pt, ph, pw, -1)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(b, -1, f * pt, h * ph, w * pw)

    @torch.no_grad()
    def prompt_kv(self, context: Tensor) -> PromptKV:
        """Cross-attention K/V of one prompt's encoder output [L <= text_len, text_dim].

        Rows past L are zero-padded to `text_len` before the text embedding, as Wan does, and
        stay attended.
        """
        cfg = self.config
        if context.dim() != 2 or context.shape[1] != cfg.text_dim or context.shape[0] > cfg.text_len:
            raise ValueError(f"prompt embedding must be [<= {cfg.text_len}, {cfg.text_dim}], got "
                             f"{tuple(context.shape)}")
        w = self.text_embedding[0].weight
        padded = torch.zeros(cfg.text_len, cfg.text_dim, dtype=w.dtype, device=w.device)
        padded[: context.shape[0]] = context.to(w.dtype)
        text = self.text_embedding(padded)
        ks, vs = zip(*(self.blocks[str(i)].cross_attn.text_kv(text) for i in self.layers),
                     strict=True)
        return PromptKV(self.layers.start, torch.stack(ks), torch.stack(vs))

    # -- whole forward ------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, prompts: PromptBatch, attend: AttendFn) -> Tensor:
        """Flow prediction v = noise - x0 for latents x [B, C, F, H, W] at per-frame t [B, F]."""
        tokens, e, e0, grid = self.embed(x, t)
        tokens = self.run_layers(tokens, e0, prompts, attend)
        return self.unpatchify(self.head(tokens, e), grid)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def init_weights(self, seed: int = 0, head_std: float = 0.02) -> None:
        """Wan's initialisation, except a non-zero head so a fresh model predicts something.

        Each block draws from its own generator seeded by (seed, layer), the shared parts from
        one seeded by `seed`: a pipeline stage holding layers a..b gets exactly the weights the
        whole model has there.
        """
        device = self.patch_embedding.weight.device
        shared = torch.Generator(device=device).manual_seed(seed)
        nn.init.xavier_uniform_(self.patch_embedding.weight, generator=shared)
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding, self.time_projection):
            for m in seq:
                if isinstance(m, nn.Linear):
                    if seq is self.time_projection:
                        nn.init.xavier_uniform_(m.weight, generator=shared)
                    else:
                        nn.init.normal_(m.weight, std=0.02, generator=shared)
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.head.weight, std=head_std, generator=shared)
        nn.init.zeros_(self.head.head.bias)
        with torch.no_grad():
            self.head.modulation.normal_(generator=shared).div_(self.config.dim ** 0.5)
        for i in self.layers:
            gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + 7919 * (i + 1)) % 2**63)
            block = self.blocks[str(i)]
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight, generator=gen)
                    nn.init.zeros_(m.bias)
            with torch.no_grad():
                block.modulation.normal_(generator=gen).div_(self.config.dim ** 0.5)
