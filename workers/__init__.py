"""Model side: the causal Wan DiT, its rolling KV cache, the sampler and checkpoint loading."""

from rollcast.workers.cache_policy import CachePolicy
from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.kv_cache import CacheFullError, KVBatch, KVCachePool
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.prompt_kv import PromptBatch, PromptKV

__all__ = [
    "CacheFullError",
    "CachePolicy",
    "CausalWanModel",
    "KVBatch",
    "KVCachePool",
    "ModelConfig",
    "PromptBatch",
    "PromptKV",
]
