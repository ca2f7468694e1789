"""An LRU cache of prompt embeddings, shared by all streams of a worker.

Encoding a prompt with umT5-XXL costs a few ms of GPU time and 11 GB of weights, while streams
re-use prompts constantly (the same prompt every block, a small set of prompts in a demo). The
cache is keyed by the cleaned prompt (`clean_prompt`), so prompts that differ only in spacing or
HTML escaping share one entry; one entry is [text_len, text_dim] (4 MB at bf16 for Wan).

Thread-safe: the map is guarded by one lock that is never held while encoding, so hits are
served while another thread encodes. Encoder calls are serialised by a second lock, and misses
are re-checked under it, so a prompt requested by several threads at once is encoded once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from rollcast.workers.text_encoder import TextEncoder, clean_prompt


@dataclass(frozen=True)
class PromptCacheStats:
    """Counters for metrics. `misses` = prompts encoded; `hits` = requests served without
    encoding (a prompt repeated within one `get_many` is encoded once, the repeats are hits)."""

    hits: int
    misses: int
    evictions: int
    entries: int
    capacity: int
    nbytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class PromptEmbeddingCache:
    """LRU of `encoder.encode` results, one [text_len, text_dim] tensor per cleaned prompt.

    Returned tensors are the cached ones, not copies: treat them as read-only.
    `capacity` 0 disables storing (every request encodes) while keeping the counters.
    """

    def __init__(self, encoder: TextEncoder, capacity: int,
                 key_fn: Callable[[str], str] = clean_prompt) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.encoder = encoder
        self.capacity = capacity
        self._key_fn = key_fn
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._nbytes = 0

    # -- lookups -------------------------------------------------------------------------------

    def get(self, prompt: str) -> Tensor:
        """The embedding [text_len, text_dim] of one prompt."""
        return self.get_many([prompt])[0]

    def get_many(self, prompts: Sequence[str]) -> list[Tensor]:
        """Embeddings of several prompts, in order; all misses are encoded in one batched call."""
        if isinstance(prompts, str):
            raise TypeError("get_many takes a sequence of prompts, not one string")
        keys = [self._key_fn(p) for p in prompts]
        found: dict[str, Tensor] = {}
        with self._lock:
            self._take_cached(keys, found)
        encoded_now = 0
        if len(found) < len(set(keys)):
            with self._encode_lock:
                with self._lock:  # another thread may have encoded some of them meanwhile
                    self._take_cached(keys, found)
                # One raw prompt per missing key: the encoder cleans it itself, and cleaning a
                # cleaned string again is not always a no-op (html-unescape runs twice).
                todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in found}
                if todo:
                    fresh = self._encode(todo)
                    encoded_now = len(fresh)
                    with self._lock:
                        self._misses += encoded_now
                        for k, v in fresh.items():
                            self._insert(k, v)
                    found.update(fresh)
        with self._lock:
            self._hits += len(keys) - encoded_now
        return [found[k] for k in keys]

    def _encode(self, todo: dict[str, str]) -> dict[str, Tensor]:
        encoded = self.encoder.encode(list(todo.values()))
        expected = (len(todo), self.encoder.text_len, self.encoder.text_dim)
        if tuple(encoded.shape) != expected:
            raise RuntimeError(f"encoder returned {tuple(encoded.shape)}, expected {expected}")
        # Own storage per entry (not views of the batch), so evicting one frees its memory.
        return {k: encoded[i].clone() for i, k in enumerate(todo)}

    def _take_cached(self, keys: Sequence[str], found: dict[str, Tensor]) -> None:
        for k in keys:
            if k not in found and k in self._entries:
                self._entries.move_to_end(k)
                found[k] = self._entries[k]

    def _insert(self, key: str, value: Tensor) -> None:
        if self.capacity == 0:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._entries[key] = value
        self._nbytes += value.nbytes
        while len(self._entries) > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self._nbytes -= evicted.nbytes
            self._evictions += 1

    # -- inspection ----------------------------------------------------------------------------

    def __contains__(self, prompt: str) -> bool:
        """Whether `prompt` is cached (neither counted nor refreshed)."""
        with self._lock:
            return self._key_fn(prompt) in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    @property
    def evictions(self) -> int:
        return self._evictions

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached embeddings."""
        return self._nbytes

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(self._hits, self._misses, self._evictions, len(self._entries),
                                    self.capacity, self._nbytes)

    def clear(self) -> None:
        """Drop all entries (counters are kept: they are cumulative for metrics)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
