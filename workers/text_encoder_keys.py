"""Key names of the umT5-XXL encoder: Wan's layout ↔ transformers' `UMT5EncoderModel`.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth` with the names of its own
`wan/modules/t5.py::T5Encoder`; transformers' `UMT5EncoderModel` computes the same function
(pre-norm T5 blocks, a relative position bias per layer, no 1/√d attention scaling, gated-GELU
FFN), so loading is a pure rename. Wan's FFN is `fc2(fc1(x) * gelu(gate(x)))` and transformers'
is `wo(gelu(wi_0(x)) * wi_1(x))`, hence `gate → wi_0` and `fc1 → wi_1`.

The module imports transformers only inside `infer_umt5_config`, so the renames stay cheap to
import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from rollcast.workers.checkpoint import CheckpointError, preview

if TYPE_CHECKING:
    from transformers import UMT5Config

# Per-block names: (Wan suffix after `blocks.{i}.`, transformers suffix after `encoder.block.{i}.`).
BLOCK_KEYS: tuple[tuple[str, str], ...] = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
WAN_EMBEDDING = "token_embedding.weight"
WAN_FINAL_NORM = "norm.weight"
# transformers holds the input embedding twice (`shared` and the encoder's `embed_tokens`, one
# tied parameter); both names appear in its state dict and either may be alone in a file.
HF_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
HF_FINAL_NORM = "encoder.final_layer_norm.weight"

_WAN_TO_HF_BLOCK = dict(BLOCK_KEYS)
_HF_TO_WAN_BLOCK = {hf: wan for wan, hf in BLOCK_KEYS}
_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")

# umT5's fixed hyper-parameters that shapes cannot tell (Wan hard-codes them as well).
RELATIVE_ATTENTION_MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6


def _raise_if(missing: list[str], unexpected: list[str], layout: str) -> None:
    if missing or unexpected:
        parts = [f"{label} ({len(keys)}): {preview(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"not a umT5 encoder state dict in {layout} layout: " + "; ".join(parts))


def _missing_block_keys(indices: set[int], suffixes: set[tuple[int, str]], prefix: str,
                        names: tuple[str, ...]) -> list[str]:
    # Every block from 0 to the highest index seen must be complete: a gap is a missing block.
    count = max(indices) + 1 if indices else 0
    return [f"{prefix}{i}.{s}" for i in range(count) for s in names if (i, s) not in suffixes]


def wan_t5_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan `T5Encoder` names → `UMT5EncoderModel` names (the embedding under both of its names).

    Raises `CheckpointError` naming unknown and missing keys. Tensors are not copied.
    """
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    indices: set[int] = set()
    seen: set[tuple[int, str]] = set()
    for key, value in sd.items():
        if key == WAN_EMBEDDING:
            for name in HF_EMBEDDINGS:
                out[name] = value
        elif key == WAN_FINAL_NORM:
            out[HF_FINAL_NORM] = value
        elif (m := _WAN_BLOCK.fullmatch(key)) and m.group(2) in _WAN_TO_HF_BLOCK:
            i = int(m.group(1))
            indices.add(i)
            seen.add((i, m.group(2)))
            out[f"encoder.block.{i}.{_WAN_TO_HF_BLOCK[m.group(2)]}"] = value
        else:
            unexpected.append(key)
    missing = [k for k in (WAN_EMBEDDING, WAN_FINAL_NORM) if k not in sd]
    missing += _missing_block_keys(indices, seen, "blocks.", tuple(_WAN_TO_HF_BLOCK))
    if not indices:
        missing.append("blocks.0.*")
    _raise_if(missing, sorted(unexpected), "Wan")
    return out


def hf_to_wan_t5(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`UMT5EncoderModel` names → Wan `T5Encoder` names.

    `shared.weight` and `encoder.embed_tokens.weight` are one tied tensor; either suffices, and
    `shared` wins when both are present. Raises `CheckpointError` naming unknown and missing keys.
    """
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    indices: set[int] = set()
    seen: set[tuple[int, str]] = set()
    for key, value in sd.items():
        if key in HF_EMBEDDINGS:
            continue
        if key == HF_FINAL_NORM:
            out[WAN_FINAL_NORM] = value
        elif (m := _HF_BLOCK.fullmatch(key)) and m.group(2) in _HF_TO_WAN_BLOCK:
            i = int(m.group(1))
            indices.add(i)
            seen.add((i, m.group(2)))
            out[f"blocks.{i}.{_HF_TO_WAN_BLOCK[m.group(2)]}"] = value
        else:
            unexpected.append(key)
    embedding = next((sd[k] for k in HF_EMBEDDINGS if k in sd), None)
    missing = [] if embedding is not None else [" or ".join(HF_EMBEDDINGS)]
    if embedding is not None:
        out[WAN_EMBEDDING] = embedding
    if HF_FINAL_NORM not in sd:
        missing.append(HF_FINAL_NORM)
    missing += _missing_block_keys(indices, seen, "encoder.block.", tuple(_HF_TO_WAN_BLOCK))
    if not indices:
        missing.append("encoder.block.0.*")
    _raise_if(missing, sorted(unexpected), "transformers")
    return out


def is_hf_layout(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict uses transformers' names (e.g. the diffusers `text_encoder/` folder)."""
    return WAN_EMBEDDING not in sd and any(k in sd for k in (*HF_EMBEDDINGS, HF_FINAL_NORM))


def to_wan_t5_layout(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan names for a state dict in either layout (validated)."""
    return hf_to_wan_t5(sd) if is_hf_layout(sd) else hf_to_wan_t5(wan_t5_to_hf(sd))


def infer_umt5_config(sd: Mapping[str, Tensor]) -> UMT5Config:
    """The `UMT5Config` of an encoder state dict (either layout), from tensor shapes alone."""
    from transformers import UMT5Config

    wan = to_wan_t5_layout(sd)
    vocab_size, d_model = wan[WAN_EMBEDDING].shape
    num_layers = sum(1 for k in wan if k.endswith(".norm1.weight"))
    d_ff = wan["blocks.0.ffn.fc1.weight"].shape[0]
    num_buckets, num_heads = wan["blocks.0.pos_embedding.embedding.weight"].shape
    inner = wan["blocks.0.attn.q.weight"].shape[0]
    if inner % num_heads:
        raise CheckpointError(f"attention width {inner} is not divisible by {num_heads} heads "
                              "(from blocks.0.pos_embedding.embedding.weight)")
    return UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=inner // num_heads, d_ff=d_ff,
        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        layer_norm_epsilon=LAYER_NORM_EPS, feed_forward_proj="gated-gelu",
        # tie_word_embeddings only concerns an lm_head, which the encoder has not (transformers
        # 5.x forces it to True for the T5 family anyway). Dropout off: this is inference only.
        tie_word_embeddings=False, dropout_rate=0.0,
    )
