"""The tiny model's text encoder: a trained word embedding over the shapes prompts' vocabulary.

It stands where umT5 stands for the real models (the `TextEncoder` protocol): a prompt becomes
[text_len, text_dim] rows, one per word, zero past the prompt's length. Each row is the word's
embedding plus a learned position embedding, so "a red circle ... and a blue square" keeps which
colour belongs to which shape. The DiT's own text_embedding MLP and cross-attention do the rest.

Words outside the vocabulary map to one shared unknown row; prompts are cleaned as Wan cleans them
(`clean_prompt`) and lower-cased. The weights and the vocabulary are one safetensors file (the
vocabulary in its metadata), which a model directory holds beside the DiT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rollcast.workers.checkpoint import CheckpointError
from rollcast.workers.text_encoder import clean_prompt

UNKNOWN = "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


class WordTextEncoder(nn.Module):
    """`TextEncoder` of the tiny model; an nn.Module so the training loop can update it."""

    def __init__(self, vocabulary: Sequence[str], text_dim: int, text_len: int) -> None:
        super().__init__()
        words = [UNKNOWN, *dict.fromkeys(w for w in vocabulary if w != UNKNOWN)]
        self.vocabulary = words
        self._index = {w: i for i, w in enumerate(words)}
        self._text_len = text_len
        self.embedding = nn.Embedding(len(words), text_dim)
        self.position = nn.Embedding(text_len, text_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)
        nn.init.normal_(self.position.weight, std=0.1)

    @property
    def text_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def text_len(self) -> int:
        return self._text_len

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):  # a str is a Sequence[str] of characters: never meant
            raise TypeError("encode/tokenize take a sequence of prompts, not one string")
        out = []
        for p in prompts:
            words = _WORD.findall(clean_prompt(p).lower())[: self._text_len]
            out.append([self._index.get(w, 0) for w in words])
        return out

    def embed(self, prompts: Sequence[str]) -> Tensor:
        """[B, text_len, text_dim] with gradients (training); zero rows past each prompt."""
        ids = self.tokenize(prompts)
        dev = self.embedding.weight.device
        out = torch.zeros(len(ids), self._text_len, self.text_dim, device=dev,
                          dtype=self.embedding.weight.dtype)
        for i, row in enumerate(ids):
            if row:
                n = len(row)
                idx = torch.tensor(row, device=dev)
                out[i, :n] = self.embedding(idx) + self.position.weight[:n]
        return out

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        return self.embed(prompts)

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"vocabulary": json.dumps(self.vocabulary), "text_len": str(self._text_len),
                "format": "rollcast-word-text-encoder"}
        save_file(tensors, str(out), metadata=meta)
        return out

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> WordTextEncoder:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        if "vocabulary" not in meta or "embedding.weight" not in tensors:
            raise CheckpointError(f"{path}: not a word text encoder (no vocabulary or embedding)")
        vocab = json.loads(meta["vocabulary"])
        emb = tensors["embedding.weight"]
        enc = cls(vocab, emb.shape[1], int(meta.get("text_len", tensors["position.weight"].shape[0])))
        if len(enc.vocabulary) != emb.shape[0]:
            raise CheckpointError(f"{path}: vocabulary of {len(enc.vocabulary)} words, {emb.shape[0]} rows")
        enc.load_state_dict(tensors, strict=True)
        return enc.to(device=device, dtype=dtype).eval().requires_grad_(False)
