"""Prompt encoding with the umT5 encoder, the way Wan2.1 conditions its DiT.

Wan's wrapper (`wan/modules/t5.py::T5EncoderModel` + `tokenizers.py::HuggingfaceTokenizer`):
clean the prompt (`clean='whitespace'`), tokenize with special tokens (EOS), truncate and pad to
`text_len` = 512, run the encoder with the attention mask, and keep only the rows of real tokens;
the DiT zero-pads them back to 512. Here the encoder runs on the batch's longest true length
instead of 512 — masked keys make the real rows independent of padding — and the result is
zero-padded to `text_len`, so `encode` returns exactly what Wan feeds the DiT: [B, text_len,
text_dim] with zero rows past each prompt.

The weights come from Wan's `.pth` (a key rename into transformers' `UMT5EncoderModel`, see
`text_encoder_keys.py`) or are synthetic (seeded) for tests and demos. Tokenizers are only ever
read from local paths; nothing here reaches the network. transformers is imported lazily, so
importing this module (for the protocol or `clean_prompt`) stays cheap.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from rollcast.workers.checkpoint import CheckpointError, read_state_dict
from rollcast.workers.text_encoder_keys import (
    BLOCK_KEYS,
    LAYER_NORM_EPS,
    RELATIVE_ATTENTION_MAX_DISTANCE,
    WAN_EMBEDDING,
    WAN_FINAL_NORM,
    hf_to_wan_t5,
    infer_umt5_config,
    to_wan_t5_layout,
    wan_t5_to_hf,
)
from rollcast.workers.transformers_import import unshadow_hub_kernels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

try:  # Wan runs ftfy.fix_text first; it is optional here (not installed on the project machines).
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy (when installed), html-unescape twice, collapse whitespace.

    The cleaned string is also the prompt-cache key, so prompts differing only in spacing or
    HTML escaping share one embedding.
    """
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


@runtime_checkable
class TextEncoder(Protocol):
    """What the serving side needs from a prompt encoder."""

    @property
    def text_dim(self) -> int: ...

    @property
    def text_len(self) -> int: ...

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """[B, text_len, text_dim]; rows past each prompt's token length are exactly zero."""
        ...


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a umT5 encoder plus the sequence length the DiT reads (`text_len`)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int = 32
    text_len: int = 512
    # "byt5": transformers' file-less byte tokenizer (vocab 384); None: a tokenizer path is needed.
    builtin_tokenizer: str | None = None
    name: str = "custom"

    @property
    def text_dim(self) -> int:
        return self.d_model

    @classmethod
    def preset(cls, name: str) -> TextEncoderConfig:
        try:
            return TEXT_ENCODER_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown text encoder config {name!r}; presets: "
                             f"{sorted(TEXT_ENCODER_PRESETS)}") from None

    def umt5_config(self) -> UMT5Config:
        unshadow_hub_kernels()
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
            layer_norm_epsilon=LAYER_NORM_EPS, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, dropout_rate=0.0,
        )


TEXT_ENCODER_PRESETS: dict[str, TextEncoderConfig] = {
    # Wan's `umt5_xxl(encoder_only=True)`; tokenizer `google/umt5-xxl` from a local directory.
    "umt5-xxl": TextEncoderConfig(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        num_buckets=32, text_len=512, name="umt5-xxl",
    ),
    # Matches the `tiny` DiT (text_dim 64, text_len 32); the byte tokenizer needs no files.
    "tiny": TextEncoderConfig(
        vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_buckets=32,
        text_len=32, builtin_tokenizer="byt5", name="tiny",
    ),
}


def load_tokenizer(source: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer object as is, or one read from a local directory (never from the hub)."""
    unshadow_hub_kernels()
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(source, PreTrainedTokenizerBase):
        return source
    path = Path(source)
    # Checked first: a string that is not a directory would otherwise be taken as a hub repo id.
    if not path.is_dir():
        raise CheckpointError(f"tokenizer {path}: no such directory (give the local folder holding "
                              "tokenizer.json / tokenizer_config.json, e.g. google/umt5-xxl's files)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"tokenizer {path}: not a readable tokenizer directory ({e})") from e


def builtin_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "byt5":
        unshadow_hub_kernels()
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    raise ValueError(f"unknown built-in tokenizer {name!r} (known: 'byt5')")


def synthetic_wan_t5_state_dict(config: TextEncoderConfig, seed: int = 0,
                                dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Seeded random weights in Wan's layout, scaled like T5's initialisation (q by
    (d_model·d_kv)^-½ and o by (heads·d_kv)^-½, standing in for the missing 1/√d in attention;
    the position bias like Wan's), so activations stay O(1) through the layers.

    One CPU generator draws the tensors in fp32 in a fixed order, so a seed gives the same
    weights on every run and machine; each is cast to `dtype` as it is drawn, so the peak host
    memory is the result plus one tensor (11.4 GB for `umt5-xxl` in bf16).
    """
    g = torch.Generator().manual_seed(seed)
    d, inner, f = config.d_model, config.num_heads * config.d_kv, config.d_ff

    def normal(shape: tuple[int, ...], std: float) -> Tensor:
        return (torch.randn(shape, generator=g) * std).to(dtype)

    sd = {WAN_EMBEDDING: normal((config.vocab_size, d), 1.0)}
    shapes_stds = {
        "norm1.weight": None, "norm2.weight": None,
        "attn.q.weight": ((inner, d), (d * config.d_kv) ** -0.5),
        "attn.k.weight": ((inner, d), d ** -0.5),
        "attn.v.weight": ((inner, d), d ** -0.5),
        "attn.o.weight": ((d, inner), (config.num_heads * config.d_kv) ** -0.5),
        "pos_embedding.embedding.weight": ((config.num_buckets, config.num_heads),
                                           (2 * config.num_buckets * config.num_heads) ** -0.5),
        "ffn.gate.0.weight": ((f, d), d ** -0.5),
        "ffn.fc1.weight": ((f, d), d ** -0.5),
        "ffn.fc2.weight": ((d, f), f ** -0.5),
    }
    for i in range(config.num_layers):
        for suffix, _ in BLOCK_KEYS:
            spec = shapes_stds[suffix]
            sd[f"blocks.{i}.{suffix}"] = torch.ones(d, dtype=dtype) if spec is None else normal(*spec)
    sd[WAN_FINAL_NORM] = torch.ones(d, dtype=dtype)
    return sd


def _build_umt5(umt5_config: UMT5Config, wan_sd: dict[str, Tensor], device: torch.device | str,
                dtype: torch.dtype) -> UMT5EncoderModel:
    """`UMT5EncoderModel` holding `wan_sd`, never materialising random weights first."""
    unshadow_hub_kernels()
    from transformers import UMT5EncoderModel

    # Built on meta, so an 11 GB encoder is not initialised in fp32 only to be overwritten.
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config)
    # Shapes are compared under Wan's names, the ones the user's file has.
    expected = hf_to_wan_t5(model.state_dict())
    misshaped = sorted(f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
                       for k, v in wan_sd.items() if k in expected and v.shape != expected[k].shape)
    odd = sorted(wan_sd.keys() ^ expected.keys())
    if misshaped or odd:
        raise CheckpointError(f"encoder weights do not fit a UMT5EncoderModel of their inferred config: "
                              f"mis-shaped {misshaped}, missing or unexpected {odd}")
    hf_sd = wan_t5_to_hf(wan_sd)
    # Cast each tensor once; both embedding names then carry the same tensor.
    cast: dict[int, Tensor] = {}
    weights = {}
    for k, v in hf_sd.items():
        if id(v) not in cast:
            cast[id(v)] = v.to(device=device, dtype=dtype)
        weights[k] = cast[id(v)]
    model.load_state_dict(weights, strict=True, assign=True)
    # assign=True gives `shared` and `encoder.embed_tokens` separate Parameter objects; re-tie
    # them so the embedding is one parameter again (as transformers builds it).
    model.tie_weights()
    # A freshly constructed transformers model is in training mode (dropout on).
    return model.eval().requires_grad_(False)


class UMT5TextEncoder:
    """`TextEncoder` backed by transformers' `UMT5EncoderModel` and any HF tokenizer."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase,
                 text_len: int = 512) -> None:
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        vocab = model.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary "
                             f"is {vocab}: they do not belong together")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._text_len = text_len
        # Padding ids are masked and their outputs zeroed, so any valid id will do.
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def text_dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def text_len(self) -> int:
        return self._text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_wan_checkpoint(
        cls,
        path: str | Path,
        tokenizer: str | Path | PreTrainedTokenizerBase,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = 512,
    ) -> UMT5TextEncoder:
        """Load Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or a transformers-layout encoder file or
        folder); the config is inferred from the tensor shapes."""
        tok = load_tokenizer(tokenizer)  # first: a bad tokenizer path fails before an 11 GB read
        wan_sd = to_wan_t5_layout(read_state_dict(path))
        model = _build_umt5(infer_umt5_config(wan_sd), wan_sd, device, dtype)
        return cls(model, tok, text_len)

    @classmethod
    def synthetic(
        cls,
        config: TextEncoderConfig | str = "tiny",
        seed: int = 0,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    ) -> UMT5TextEncoder:
        """Seeded random weights (same on every run); the config's built-in tokenizer unless one
        is given."""
        cfg = TextEncoderConfig.preset(config) if isinstance(config, str) else config
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        elif cfg.builtin_tokenizer is not None:
            tok = builtin_tokenizer(cfg.builtin_tokenizer)
        else:
            raise ValueError(f"text encoder config {cfg.name!r} has no built-in tokenizer; pass "
                             "tokenizer= (a local directory or a tokenizer object)")
        weights = synthetic_wan_t5_state_dict(cfg, seed, dtype)
        model = _build_umt5(cfg.umt5_config(), weights, device, dtype)
        return cls(model, tok, cfg.text_len)

    # -- encoding ----------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of the cleaned prompts, special tokens added, truncated to `text_len`."""
        if isinstance(prompts, str):  # a str is a Sequence[str] of characters: never meant
            raise TypeError("encode/tokenize take a sequence of prompts, not one string")
        cleaned = [clean_prompt(p) for p in prompts]
        if not cleaned:
            return []
        ids = self.tokenizer(cleaned, add_special_tokens=True, truncation=True,
                             max_length=self._text_len)["input_ids"]
        return [list(row)[: self._text_len] for row in ids]

    # no_grad rather than inference_mode: the results are cached and blended later, and
    # inference tensors would refuse in-place use outside inference mode.
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        ids = self.tokenize(prompts)
        out = torch.zeros(len(ids), self._text_len, self.text_dim, dtype=self.dtype, device=self.device)
        longest = max((len(row) for row in ids), default=0)
        if longest == 0:
            return out
        input_ids = torch.full((len(ids), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # Zero, not merely ignore, the padded rows: Wan keeps `u[:seq_len]` and pads with zeros.
        out[:, :longest] = hidden.masked_fill(mask[..., None] == 0, 0)
        return out

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        c = self.model.config
        return (f"UMT5TextEncoder(layers={c.num_layers}, d_model={c.d_model}, vocab={c.vocab_size}, "
                f"text_len={self._text_len}, dtype={self.dtype}, device={self.device}, "
                f"params={self.parameter_count() / 1e9:.2f}B)")

