"""umT5 text encoding: Wan key layout, loading, the encode contract, tokenizers, the prompt cache."""

from __future__ import annotations

import importlib.metadata
import math
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import ByT5Tokenizer, UMT5EncoderModel

from rollcast.workers.checkpoint import CheckpointError
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.prompt_cache import PromptEmbeddingCache
from rollcast.workers.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    UMT5TextEncoder,
    clean_prompt,
    synthetic_wan_t5_state_dict,
)
from rollcast.workers.text_encoder_keys import hf_to_wan_t5, infer_umt5_config, wan_t5_to_hf
from tests.helpers import tiny_model

TINY = TextEncoderConfig.preset("tiny")
WAN_BLOCK_SUFFIXES = (
    "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
    "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
    "ffn.fc2.weight",
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (e.g. a hub lookup) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def encoder() -> UMT5TextEncoder:
    return UMT5TextEncoder.synthetic("tiny", seed=0)


def hf_source_model(seed: int = 1) -> UMT5EncoderModel:
    """A transformers model initialised by transformers itself (independent of our init)."""
    torch.manual_seed(seed)
    return UMT5EncoderModel(TINY.umt5_config()).eval()


# -- key layout -----------------------------------------------------------------------------------


def test_key_rename_round_trips_both_ways() -> None:
    hf = hf_source_model().state_dict()
    wan = hf_to_wan_t5(hf)
    expected_wan = {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{i}.{s}" for i in range(TINY.num_layers) for s in WAN_BLOCK_SUFFIXES}
    assert set(wan) == expected_wan
    # Spot checks written out by hand (not from the module's table): FFN gate/fc1 order, bias.
    pairs = {
        "token_embedding.weight": "shared.weight",
        "norm.weight": "encoder.final_layer_norm.weight",
        "blocks.1.norm1.weight": "encoder.block.1.layer.0.layer_norm.weight",
        "blocks.1.attn.o.weight": "encoder.block.1.layer.0.SelfAttention.o.weight",
        "blocks.1.pos_embedding.embedding.weight":
            "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
        "blocks.1.ffn.gate.0.weight": "encoder.block.1.layer.1.DenseReluDense.wi_0.weight",
        "blocks.1.ffn.fc1.weight": "encoder.block.1.layer.1.DenseReluDense.wi_1.weight",
        "blocks.1.ffn.fc2.weight": "encoder.block.1.layer.1.DenseReluDense.wo.weight",
        "blocks.0.norm2.weight": "encoder.block.0.layer.1.layer_norm.weight",
    }
    for w, h in pairs.items():
        assert wan[w] is hf[h], w
    back = wan_t5_to_hf(wan)
    assert set(back) == set(hf)
    assert back["shared.weight"] is back["encoder.embed_tokens.weight"] is wan["token_embedding.weight"]
    assert all(back[k] is wan[w] for w, k in pairs.items())
    assert hf_to_wan_t5(back).keys() == wan.keys()
    # Either embedding name alone is enough on the transformers side (diffusers files hold one).
    only_embed = {k: v for k, v in hf.items() if k != "shared.weight"}
    assert hf_to_wan_t5(only_embed)["token_embedding.weight"] is hf["encoder.embed_tokens.weight"]


def test_unknown_and_missing_keys_are_named() -> None:
    wan = synthetic_wan_t5_state_dict(TINY)
    with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.0\.attn\.q\.bias"):
        wan_t5_to_hf({**wan, "blocks.0.attn.q.bias": torch.zeros(1)})
    partial = {k: v for k, v in wan.items() if k != "blocks.1.ffn.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.ffn\.fc2\.weight"):
        wan_t5_to_hf(partial)
    with pytest.raises(CheckpointError, match=r"missing.*token_embedding\.weight"):
        wan_t5_to_hf({k: v for k, v in wan.items() if k != "token_embedding.weight"})
    # A gap in the block numbering is a missing block.
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in wan.items()}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.norm1\.weight"):
        wan_t5_to_hf(gap)
    hf = wan_t5_to_hf(wan)
    with pytest.raises(CheckpointError, match=r"unexpected.*lm_head\.weight"):
        hf_to_wan_t5({**hf, "lm_head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"missing.*shared\.weight"):
        hf_to_wan_t5({k: v for k, v in hf.items() if "embed" not in k and k != "shared.weight"})


def test_infer_config_from_shapes() -> None:
    wan = synthetic_wan_t5_state_dict(TINY)
    for sd in (wan, wan_t5_to_hf(wan)):
        cfg = infer_umt5_config(sd)
        assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads,
                cfg.relative_attention_num_buckets) == (384, 64, 16, 128, 2, 4, 32)
        assert cfg.relative_attention_max_distance == 128
        assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
        # (tie_word_embeddings is not checked: transformers 5.x forces True for the T5 family,
        # and it only concerns an lm_head, which the encoder has not.)


def test_xxl_config_on_meta_matches_wan() -> None:
    with torch.device("meta"):
        model = UMT5EncoderModel(TextEncoderConfig.preset("umt5-xxl").umt5_config())
    wan = hf_to_wan_t5(model.state_dict())
    assert sum(math.prod(v.shape) for v in wan.values()) == 5_680_910_336
    assert wan["token_embedding.weight"].shape == (256384, 4096)
    assert wan["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert wan["blocks.0.ffn.fc1.weight"].shape == (10240, 4096)
    assert "blocks.24.norm1.weight" not in wan
    cfg = infer_umt5_config(wan)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (
        256384, 4096, 64, 10240, 24, 64)


# -- loading Wan's .pth ------------------------------------------------------------------------


def test_wan_pth_loads_with_outputs_identical_to_source(tmp_path: Path) -> None:
    source = hf_source_model(seed=1)
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.clone() for k, v in hf_to_wan_t5(source.state_dict()).items()}, str(path))
    loaded = UMT5TextEncoder.from_wan_checkpoint(path, ByT5Tokenizer(), dtype=torch.float32,
                                                 text_len=TINY.text_len)
    assert not loaded.model.training
    assert loaded.model.shared.weight is loaded.model.encoder.embed_tokens.weight
    tok = ByT5Tokenizer()
    for prompt in ("a red fox jumps over the lazy dog, truncated", "snow"):
        ids = torch.tensor([tok(prompt, truncation=True, max_length=TINY.text_len)["input_ids"]])
        with torch.no_grad():
            ref = source(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        got = loaded.encode([prompt])[0]
        n = ids.shape[1]
        assert torch.equal(got[:n], ref)
        assert torch.equal(got[n:], torch.zeros_like(got[n:]))


def _wan_t5_reference(sd: dict[str, Tensor], ids: Tensor, mask: Tensor, num_heads: int) -> Tensor:
    """Wan's `T5Encoder` math written out (pre-norm RMS, bucketed per-layer bias, no 1/√d,
    `fc2(fc1(x) * gelu_tanh(gate(x)))`), run on ids padded to the full length like Wan."""
    eps, max_dist = 1e-6, 128
    b, n = ids.shape
    buckets = sd["blocks.0.pos_embedding.embedding.weight"].shape[0] // 2  # bidirectional halves
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    dist = rel.abs()
    exact = buckets // 2
    far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_dist / exact)
                   * (buckets - exact)).long()
    bucket = (rel > 0).long() * buckets + torch.where(dist < exact, dist, far.clamp(max=buckets - 1))

    def rms(x: Tensor, w: Tensor) -> Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def gelu_tanh(x: Tensor) -> Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = sd["token_embedding.weight"][ids]
    layers = sum(1 for k in sd if k.endswith("norm1.weight"))
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{m}.weight"].T).view(b, n, num_heads, -1) for m in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(-1)
        x = x + torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        ffn = (h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)
        x = x + ffn @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_matches_wan_t5_math_padded_to_text_len(tmp_path: Path) -> None:
    wan = synthetic_wan_t5_state_dict(TINY, seed=5)
    path = tmp_path / "t5.pth"
    torch.save(wan, str(path))
    enc = UMT5TextEncoder.from_wan_checkpoint(path, ByT5Tokenizer(), dtype=torch.float32,
                                              text_len=TINY.text_len)
    prompts = ["A cat  on a  skateboard", "", "rain over a neon city at night, slow dolly shot"]
    # Wan's wrapper: cleaned prompts padded to text_len, the mask from the tokenizer.
    tok = ByT5Tokenizer()([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                          max_length=TINY.text_len, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    ref = _wan_t5_reference(wan, ids, mask, TINY.num_heads) * mask[..., None]
    got = enc.encode(prompts)
    assert got.shape == (3, TINY.text_len, TINY.text_dim)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_transformers_layout_safetensors_loads_too(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    wan = synthetic_wan_t5_state_dict(TINY, seed=2)
    # diffusers' text_encoder files hold `shared.weight` only (safetensors refuses aliases).
    hf = {k: v for k, v in wan_t5_to_hf(wan).items() if k != "encoder.embed_tokens.weight"}
    save_file(hf, str(tmp_path / "model.safetensors"))
    torch.save(wan, str(tmp_path / "t5.pth"))
    a = UMT5TextEncoder.from_wan_checkpoint(tmp_path / "model.safetensors", ByT5Tokenizer(),
                                            dtype=torch.float32, text_len=32)
    b = UMT5TextEncoder.from_wan_checkpoint(tmp_path / "t5.pth", ByT5Tokenizer(),
                                            dtype=torch.float32, text_len=32)
    assert torch.equal(a.encode(["layout"]), b.encode(["layout"]))


def test_checkpoint_shape_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    wan = synthetic_wan_t5_state_dict(TINY)
    wan["blocks.1.ffn.fc1.weight"] = torch.zeros(100, TINY.d_model)
    torch.save(wan, str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.fc1\.weight \(100, 64\)"):
        UMT5TextEncoder.from_wan_checkpoint(tmp_path / "bad.pth", ByT5Tokenizer())


# -- the encode contract ----------------------------------------------------------------------


def test_encode_zero_rows_truncation_and_empty_prompt(encoder: UMT5TextEncoder) -> None:
    long = "x" * 100
    out = encoder.encode(["abc", "", long, long[:31] + "different tail"])
    assert out.shape == (4, 32, 64) and out.dtype == torch.float32
    nonzero = out.abs().sum(-1) > 0
    # byte tokens + EOS; the empty prompt is the EOS row alone; long prompts are truncated.
    assert nonzero.sum(-1).tolist() == [4, 1, 32, 32]
    assert torch.equal(nonzero, torch.arange(32)[None] < torch.tensor([4, 1, 32, 32])[:, None])
    assert torch.equal(out[2], out[3])  # same first 31 bytes + EOS after truncation
    assert isinstance(encoder, TextEncoder)
    assert (encoder.text_dim, encoder.text_len) == (64, 32)
    with pytest.raises(TypeError):
        encoder.encode("one string")
    assert encoder.encode([]).shape == (0, 32, 64)


def test_encode_batch_matches_single_and_cleaning(encoder: UMT5TextEncoder) -> None:
    prompts = ["a fox in snow", "a  much longer prompt about a fox"]
    batch = encoder.encode(prompts)
    # Encoding at the batch's longest length (not text_len) leaves the real rows unchanged.
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batch[i], encoder.encode([p])[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(batch[0, :3], batch[1, :3])
    assert clean_prompt("  a\t fox &amp;amp; \n dog ") == "a fox & dog"
    assert encoder.tokenize(["  a\t fox \n"]) == encoder.tokenize(["a fox"])


def test_synthetic_weights_are_seeded() -> None:
    a = UMT5TextEncoder.synthetic("tiny", seed=7).encode(["seed"])
    b = UMT5TextEncoder.synthetic("tiny", seed=7).encode(["seed"])
    c = UMT5TextEncoder.synthetic("tiny", seed=8).encode(["seed"])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_xxl_preset_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        UMT5TextEncoder.synthetic("umt5-xxl")


def test_tiny_encoder_feeds_the_tiny_dit(encoder: UMT5TextEncoder) -> None:
    dit = ModelConfig.preset("tiny")
    assert (encoder.text_dim, encoder.text_len) == (dit.text_dim, dit.text_len)
    model = tiny_model()
    emb = encoder.encode(["a fox"])[0]
    kv = model.prompt_kv(emb)
    assert torch.isfinite(kv.k).all()


# -- tokenizers from local paths ------------------------------------------------------------------


def _save_word_tokenizer(path: Path) -> list[str]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "jumps", "over", "the", "lazy", "dog", "in"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))
    return words


def test_tokenizer_from_local_directory(tmp_path: Path) -> None:
    words = _save_word_tokenizer(tmp_path / "tok")
    cfg = TextEncoderConfig(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4, text_len=6)
    enc = UMT5TextEncoder.synthetic(cfg, seed=0, tokenizer=tmp_path / "tok")
    assert enc.tokenize(["a red fox", "zebra  fox", ""]) == [[3, 4, 5, 1], [2, 5, 1], [1]]
    assert enc.tokenize(["a red fox jumps over the lazy dog"]) == [[3, 4, 5, 6, 7, 1]]  # keeps EOS
    out = enc.encode(["a red fox", "zebra  fox", ""])
    assert ((out.abs().sum(-1) > 0).sum(-1)).tolist() == [4, 3, 1]
    # The same directory as a string through the checkpoint path.
    torch.save(synthetic_wan_t5_state_dict(cfg, seed=0), str(tmp_path / "t5.pth"))
    loaded = UMT5TextEncoder.from_wan_checkpoint(tmp_path / "t5.pth", str(tmp_path / "tok"),
                                                 dtype=torch.float32, text_len=6)
    assert torch.equal(loaded.encode(["a red fox"]), enc.encode(["a red fox"]))


def test_bad_tokenizer_paths_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(CheckpointError, match="no-such-tokenizer"):
        UMT5TextEncoder.synthetic("tiny", tokenizer=missing)
    with pytest.raises(CheckpointError, match="no-such-tokenizer"):
        UMT5TextEncoder.from_wan_checkpoint(tmp_path / "t5.pth", str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        UMT5TextEncoder.synthetic("tiny", tokenizer=empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="broken"):
        UMT5TextEncoder.synthetic("tiny", tokenizer=broken)


def test_tokenizer_larger_than_vocab_is_rejected() -> None:
    cfg = TextEncoderConfig(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            text_len=8, builtin_tokenizer="byt5")
    with pytest.raises(ValueError, match="vocabulary"):
        UMT5TextEncoder.synthetic(cfg)


# -- prompt cache ---------------------------------------------------------------------------------


class CountingEncoder:
    """Deterministic fake encoder: rows from a hash of the cleaned prompt; records every call."""

    text_dim = 8
    text_len = 4

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = delay_s

    def encode(self, prompts: Sequence[str]) -> Tensor:
        self.calls.append(list(prompts))
        time.sleep(self.delay_s)
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(zlib.crc32(clean_prompt(p).encode()))
            out[i, :2] = torch.randn(2, self.text_dim, generator=g)
        return out


def test_cache_hits_skip_the_encoder_and_misses_are_batched() -> None:
    enc = CountingEncoder()
    cache = PromptEmbeddingCache(enc, capacity=8)
    first = cache.get_many(["a", "b", "c", "a"])
    assert enc.calls == [["a", "b", "c"]]  # one batched call, the repeat encoded once
    assert torch.equal(first[0], first[3]) and first[0] is first[3]
    again = cache.get("b")
    assert len(enc.calls) == 1 and again is first[1]
    cache.get_many(["c", "d"])
    assert enc.calls[1] == ["d"]
    assert (cache.hits, cache.misses, cache.evictions) == (3, 4, 0)
    assert cache.nbytes == 4 * 4 * 8 * 4 == cache.stats().nbytes
    assert cache.stats().hit_rate == pytest.approx(3 / 7)
    assert cache.get("a").shape == (4, 8)


def test_cache_evicts_least_recently_used() -> None:
    enc = CountingEncoder()
    cache = PromptEmbeddingCache(enc, capacity=2)
    cache.get("a")
    cache.get("b")
    cache.get("a")  # refresh a: b is now the oldest
    cache.get("c")
    assert cache.keys() == ["a", "c"]
    assert "b" not in cache and "a" in cache
    assert cache.evictions == 1 and len(cache) == 2
    cache.get("b")
    assert cache.keys() == ["c", "b"] and cache.evictions == 2
    assert cache.nbytes == 2 * 4 * 8 * 4
    with pytest.raises(ValueError):
        PromptEmbeddingCache(enc, capacity=-1)


def test_cache_shares_entries_across_whitespace_and_capacity_zero() -> None:
    enc = CountingEncoder()
    cache = PromptEmbeddingCache(enc, capacity=4)
    a = cache.get("a red  fox")
    b = cache.get("  a red\tfox\n")
    assert a is b and len(enc.calls) == 1 and len(cache) == 1
    off = PromptEmbeddingCache(enc, capacity=0)
    off.get("x")
    off.get("x")
    assert len(off) == 0 and off.misses == 2 and off.nbytes == 0


def test_cache_is_thread_safe_and_encodes_each_prompt_once() -> None:
    enc = CountingEncoder(delay_s=0.02)
    cache = PromptEmbeddingCache(enc, capacity=16)
    prompts = [f"prompt {i}" for i in range(6)]
    results: list[list[Tensor]] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        got = cache.get_many(prompts[offset:] + prompts[:offset])
        with lock:
            results.append(got[-offset:] + got[:-offset] if offset else got)

    threads = [threading.Thread(target=worker, args=(i % 6,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    encoded = [p for call in enc.calls for p in call]
    assert sorted(encoded) == sorted(prompts)  # no prompt encoded twice
    assert cache.hits + cache.misses == 8 * 6 and cache.misses == 6
    for got in results:
        for p, t in zip(prompts, got, strict=True):
            assert t is cache.get(p)


def test_cache_with_real_encoder(encoder: UMT5TextEncoder) -> None:
    cache = PromptEmbeddingCache(encoder, capacity=4)
    got = cache.get_many(["a fox", "a  dog"])
    torch.testing.assert_close(got[1], encoder.encode(["a dog"])[0], atol=1e-5, rtol=1e-5)
    assert got[0].shape == (encoder.text_len, encoder.text_dim)
    assert cache.nbytes == 2 * 32 * 64 * 4


def test_umt5_builds_with_the_checkout_first_on_sys_path() -> None:
    # `python -c` from the checkout puts its root first on sys.path, beside our `kernels/` folder;
    # transformers (>= 5) imports HF's `kernels` package while loading UMT5EncoderModel.
    root = Path(__file__).resolve().parent.parent
    script = (
        "import sys\n"
        "from rollcast.workers.text_encoder import TextEncoderConfig, UMT5TextEncoder\n"
        "enc = UMT5TextEncoder.synthetic(TextEncoderConfig.preset('tiny'), seed=0)\n"
        "print(enc.encode(['a red circle']).shape)\n"
        "import kernels\n"
        "print(kernels.__file__)\n"
        "print(sys.path[0] == '')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, kernels_file, path_kept = out.stdout.split("\n")[:3]
    assert shape == "torch.Size([1, 32, 64])"
    assert path_kept == "True"  # sys.path is restored after the import
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    assert not Path(kernels_file).resolve().is_relative_to(root / "kernels")
