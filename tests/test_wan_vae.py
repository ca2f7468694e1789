"""Wan VAE: published key layout, streaming == whole sequence == Wan's own feat_cache walk,
frame-count rules, batching, weights in and out."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollcast.workers.checkpoint import CheckpointError
from rollcast.workers.vae import StreamingVAE, build_vae, video_frames
from rollcast.workers.wan_vae import (
    AttentionBlock,
    CausalConv3d,
    Downsample,
    ResidualBlock,
    Upsample,
    WanDecodeState,
    WanEncodeState,
    WanVAE,
    WanVAEConfig,
    write_wan_vae_checkpoint,
)

SMALL = WanVAEConfig.preset("small")
HW = (32, 32)  # 4x4 latents


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE.build(SMALL, seed=0)


def video(frames: int, batch: int = 1, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, *HW, generator=g) * 2 - 1


def latents(n: int, batch: int = 1, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, n, HW[0] // 8, HW[1] // 8, generator=g)


def assert_close(a: Tensor, b: Tensor) -> None:
    assert a.shape == b.shape
    scale = b.abs().max().item()
    assert scale > 0.1  # something to compare
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)


def encode_in_chunks(vae: WanVAE, x: Tensor, sizes: list[int]) -> Tensor:
    assert sum(sizes) == x.shape[2]
    state, out, t = vae.encode_state(), [], 0
    for n in sizes:
        out.append(vae.encode_chunk(x[:, :, t:t + n], state))
        t += n
    return torch.cat(out, dim=2)


def decode_in_chunks(vae: WanVAE, z: Tensor, sizes: list[int]) -> Tensor:
    assert sum(sizes) == z.shape[2]
    state, out, t = vae.decode_state(), [], 0
    for n in sizes:
        frames = vae.decode_chunk(z[:, :, t:t + n], state)
        assert frames.shape[2] == (video_frames(n) if t == 0 else 4 * n)
        out.append(frames)
        t += n
    return torch.cat(out, dim=2)


# -- layout ----------------------------------------------------------------------------------------


# Shapes quoted in reference/model.md 5.1 (from Wan2.1_VAE.pth).
PUBLISHED_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.3.residual.6.bias": (192,),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
}


def meta_model(cfg: WanVAEConfig) -> WanVAE:
    with torch.device("meta"):
        return WanVAE(cfg)


def test_full_preset_has_the_published_parameters():
    full = meta_model(WanVAEConfig.preset("full"))
    sd = full.state_dict()
    assert sum(p.numel() for p in full.parameters()) == 126_892_531
    assert len(sd) == 194
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "conv1", "conv2"}
    assert sorted(k for k in sd if "time_conv.weight" in k) == [
        "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.7.time_conv.weight",
        "encoder.downsamples.5.time_conv.weight", "encoder.downsamples.8.time_conv.weight"]
    # one state slot per temporal layer: Wan's 32-tensor decoder cache
    assert (full.encoder.num_slots, full.decoder.num_slots) == (24, 32)


def test_small_preset_has_the_same_keys():
    full, small = meta_model(WanVAEConfig.preset("full")), meta_model(SMALL)
    assert small.state_dict().keys() == full.state_dict().keys()
    assert small.z_dim == 16 and small.config.dim < 96


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"'huge'.*\['full', 'small'\]"):
        WanVAEConfig.preset("huge")


def test_interface_and_shapes(vae):
    assert isinstance(vae, StreamingVAE)
    assert (vae.kind, vae.z_dim, vae.temporal_stride, vae.spatial_stride) == ("wan", 16, 4, 8)
    z = vae.encode(video(9))
    assert z.shape == (1, 16, 3, 4, 4)
    assert torch.isfinite(z).all() and 0.1 < z.std() < 3  # a sane random init
    x = vae.decode(latents(3))
    assert x.shape == (1, 3, 9, *HW)
    assert 0.05 < x.std() < 0.9 and x.abs().max() <= 1
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_factory_builds_it():
    built = build_vae("wan", "small", seed=0)
    assert isinstance(built, WanVAE) and built.config == SMALL


# -- Wan's own algorithm, as the oracle --------------------------------------------------------------
# Wan's WanVAE_.encode/decode walk the network once per chunk (1, 4, 4, ... frames; one latent at a
# time), with a flat cache list indexed by a counter reset per chunk. Re-expressed here on the
# model's own weights, with Wan's rearranges instead of the model's fused per-frame convs.


class WanCache:
    def __init__(self) -> None:
        self.slots: list[object] = []
        self.i = 0

    def take(self) -> object:
        if self.i == len(self.slots):
            self.slots.append(None)
        return self.slots[self.i]

    def put(self, value: object) -> None:
        self.slots[self.i] = value
        self.i += 1


def wan_causal_conv(conv: nn.Conv3d, x: Tensor, prev: Tensor | None = None) -> Tensor:
    pad = conv.kernel_size[0] - 1
    if prev is not None:
        x, pad = torch.cat([prev, x], 2), pad - prev.shape[2]
    return nn.Conv3d.forward(conv, F.pad(x, (0, 0, 0, 0, pad, 0)))


def wan_cached_conv(conv: nn.Conv3d, x: Tensor, cache: WanCache) -> Tensor:
    prev = cache.take()
    keep = x[:, :, -2:].clone()
    if keep.shape[2] < 2 and prev is not None:
        keep = torch.cat([prev[:, :, -1:], keep], 2)
    cache.put(keep)
    return wan_causal_conv(conv, x, prev)


def per_frame(fn: nn.Module, x: Tensor) -> Tensor:  # 'b c t h w -> (b t) c h w' and back
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


def wan_attention(block: AttentionBlock, x: Tensor) -> Tensor:
    def attend(f: Tensor) -> Tensor:
        n, c, h, w = f.shape
        qkv = block.to_qkv(F.normalize(f, dim=1) * c**0.5 * block.norm.gamma)
        q, k, v = qkv.reshape(n, 1, 3 * c, h * w).permute(0, 1, 3, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1).reshape(n, c, h, w)
        return block.proj(out)
    return x + per_frame(attend, x)


def wan_layer(layer: nn.Module, x: Tensor, cache: WanCache) -> Tensor:
    if isinstance(layer, AttentionBlock):
        return wan_attention(layer, x)
    if isinstance(layer, ResidualBlock):
        n1, _, c1, n2, _, _, c2 = layer.residual
        h = wan_cached_conv(c1, F.silu(n1(x)), cache)
        return layer.shortcut(x) + wan_cached_conv(c2, F.silu(n2(h)), cache)
    if isinstance(layer, Upsample) and layer.temporal:
        prev = cache.take()
        if prev is None:
            cache.put("Rep")  # first chunk: no temporal upsampling
        else:
            keep = x[:, :, -2:].clone()
            if keep.shape[2] < 2:
                first = torch.zeros_like(keep) if isinstance(prev, str) else prev[:, :, -1:]
                keep = torch.cat([first, keep], 2)
            x = wan_causal_conv(layer.time_conv, x, None if isinstance(prev, str) else prev)
            cache.put(keep)
            b, c2, t, h, w = x.shape
            x = torch.stack((x[:, : c2 // 2], x[:, c2 // 2:]), 3).reshape(b, c2 // 2, 2 * t, h, w)
    x = per_frame(layer.resample, x)
    if isinstance(layer, Downsample) and layer.temporal:
        prev = cache.take()
        if prev is None:
            cache.put(x.clone())  # first chunk: no temporal downsampling
        else:
            keep = x[:, :, -1:].clone()
            x = layer.time_conv(torch.cat([prev[:, :, -1:], x], 2))
            cache.put(keep)
    return x


def wan_walk(net: nn.Module, x: Tensor, cache: WanCache) -> Tensor:
    cache.i = 0
    x = wan_cached_conv(net.conv1, x, cache)
    body = [*net.downsamples, *net.middle] if hasattr(net, "downsamples") else [*net.middle, *net.upsamples]
    for layer in body:
        x = wan_layer(layer, x, cache)
    norm, _, conv = net.head
    return wan_cached_conv(conv, F.silu(norm(x)), cache)


def wan_encode(vae: WanVAE, x: Tensor) -> Tensor:
    cache = WanCache()
    chunks = [x[:, :, :1], *x[:, :, 1:].split(4, dim=2)]
    out = torch.cat([wan_walk(vae.encoder, c, cache) for c in chunks], 2)
    mu = vae.conv1(out).chunk(2, dim=1)[0]
    return (mu - vae.latent_mean) * (1.0 / vae.latent_std)


def wan_decode(vae: WanVAE, z: Tensor) -> Tensor:
    cache = WanCache()
    x = vae.conv2(z / (1.0 / vae.latent_std) + vae.latent_mean)
    return torch.cat([wan_walk(vae.decoder, x[:, :, i:i + 1], cache) for i in range(z.shape[2])],
                     2).clamp(-1, 1)


@torch.no_grad()
def test_whole_sequence_paths_equal_wans_chunked_walk(vae):
    x = video(13, seed=1)
    assert_close(vae.encode(x), wan_encode(vae, x))
    z = latents(5, seed=2)
    assert_close(vae.decode(z), wan_decode(vae, z))


@torch.no_grad()
def test_first_frame_bypasses_the_temporal_resamples():
    """The layer rules in isolation: downsample3d keeps frame 0 and includes it in later convs;
    upsample3d keeps frame 0 and runs its time conv as if the stream began at frame 1 ('Rep')."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 8, 8)
    down = Downsample(4, temporal=True)
    y = per_frame(down.resample, x)
    out = down(x)
    assert out.shape[2] == 3
    torch.testing.assert_close(out[:, :, :1], y[:, :, :1])
    torch.testing.assert_close(out[:, :, 1:], down.time_conv(y))  # frames (0,1,2), (2,3,4)

    up = Upsample(4, temporal=True)
    out = up(x)
    assert out.shape[2] == 1 + 2 * 4
    changed = x.clone()
    changed[:, :, 0] += 1
    torch.testing.assert_close(up(changed)[:, :, 1:], out[:, :, 1:])  # frame 0 never reaches time_conv
    t1 = up.time_conv.weight[:, :, -1, 0, 0] @ x[0, :, 1].flatten(1) + up.time_conv.bias[:, None]
    first_half = per_frame(up.resample, t1[:4].view(1, 4, 1, 8, 8))  # frame 1 <- channels [0, C)
    second_half = per_frame(up.resample, t1[4:].view(1, 4, 1, 8, 8))
    torch.testing.assert_close(out[:, :, 1:2], first_half)
    torch.testing.assert_close(out[:, :, 2:3], second_half)


# -- streaming == whole sequence -----------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 4, 4, 4, 4, 4], [9, 8, 4], [21]])
def test_encode_chunks_equal_whole_sequence(vae, sizes):
    x = video(21, seed=3)
    assert_close(encode_in_chunks(vae, x, sizes), vae.encode(x))


@pytest.mark.parametrize("sizes", [[1] * 6, [1, 3, 2], [2, 4], [6]])
def test_decode_chunks_equal_whole_sequence(vae, sizes):
    z = latents(6, seed=4)
    assert_close(decode_in_chunks(vae, z, sizes), vae.decode(z))


def test_batch_rows_are_independent(vae):
    x = torch.cat([video(9, seed=5), video(9, seed=6)])
    z = encode_in_chunks(vae, x, [5, 4])
    for row in range(2):
        assert_close(z[row:row + 1], encode_in_chunks(vae, x[row:row + 1], [5, 4]))
    zz = torch.cat([latents(4, seed=7), latents(4, seed=8)])
    frames = decode_in_chunks(vae, zz, [1, 2, 1])
    for row in range(2):
        assert_close(frames[row:row + 1], decode_in_chunks(vae, zz[row:row + 1], [1, 2, 1]))
    assert not torch.allclose(frames[0], frames[1])


def test_states_are_separate_and_do_not_grow(vae):
    z = latents(5, seed=9)
    a, b = vae.decode_state(), vae.decode_state()
    vae.decode_chunk(z[:, :, :1], a)
    sizes = []
    for i in range(1, 5):
        vae.decode_chunk(z[:, :, i:i + 1], a)
        sizes.append(a.nbytes())
    assert sizes[0] > 0 and len(set(sizes)) == 1  # two frames per layer, whatever the length
    assert b.nbytes() == 0 and not b.started and a.started
    assert vae.decode_chunk(z[:, :, :1], b).shape[2] == 1  # a fresh stream starts at one frame


# -- errors and flags ---------------------------------------------------------------------------------


def test_chunk_frame_counts_are_enforced(vae):
    s = vae.encode_state()
    with pytest.raises(ValueError, match=r"first encode_chunk .* 1 \+ 4k frames .* got 4"):
        vae.encode_chunk(video(4), s)
    assert vae.encode_chunk(video(5), s).shape[2] == 2
    with pytest.raises(ValueError, match=r"after the first takes 4k frames .* got 5"):
        vae.encode_chunk(video(5), s)
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, T >= 1, H, W\]"):
        vae.encode_chunk(video(8)[:, :, :0], s)
    assert vae.encode_chunk(video(8), s).shape[2] == 2
    with pytest.raises(ValueError, match=r"size 16x32, but this stream has batch 1 and size 32x32"):
        vae.encode_chunk(video(4)[:, :, :, :16], s)
    with pytest.raises(ValueError, match=r"multiples of 8, got 32x28"):
        vae.encode(video(5)[..., :28])
    with pytest.raises(ValueError, match=r"encode takes 1 \+ 4k frames .* got 8"):
        vae.encode(video(8))
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, n >= 1, h, w\], got \(1, 16, 0, 4, 4\)"):
        vae.decode_chunk(latents(1)[:, :, :0], vae.decode_state())
    with pytest.raises(TypeError, match="expected a WanDecodeState"):
        vae.decode_chunk(latents(1), vae.encode_state())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="belongs to a VAE of another shape"):
        vae.encode_chunk(video(1), WanEncodeState(past=[None] * 3))
    d = vae.decode_state()
    vae.decode_chunk(latents(1, batch=2), d)
    with pytest.raises(ValueError, match="chunk has batch 1 and size 4x4, but this stream has batch 2"):
        vae.decode_chunk(latents(1), d)
    assert isinstance(d, WanDecodeState)


def test_decode_clamps(vae):
    x = vae.decode(50 * latents(2, seed=10))
    assert x.max() == 1 and x.min() == -1


def test_encode_without_scaling_gives_raw_mu(vae):
    raw = WanVAE.build(dataclasses.replace(SMALL, scale_on_encode=False), seed=0)
    x = video(5, seed=11)
    mean, std = vae.latent_mean, vae.latent_std
    assert_close(raw.encode(x), vae.encode(x) * std + mean)
    assert_close(raw.encode_chunk(x, raw.encode_state()), raw.encode(x))


def test_no_graph_is_recorded():
    bare = WanVAE(SMALL)  # parameters still require grad
    assert bare.encode(video(1)).grad_fn is None
    assert bare.decode_chunk(latents(1), bare.decode_state()).grad_fn is None


# -- weights ------------------------------------------------------------------------------------------


def test_random_init_is_seeded(vae):
    again, other = WanVAE.build(SMALL, seed=0), WanVAE.build(SMALL, seed=1)
    x = video(5)
    assert torch.equal(again.encode(x), vae.encode(x))
    assert not torch.allclose(other.encode(x), vae.encode(x))
    half = WanVAE.build(SMALL, seed=0, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.latent_mean.dtype == torch.bfloat16
    assert half.decode(latents(1)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "vae.safetensors"])
def test_checkpoint_round_trip(tmp_path, vae, name):
    path = write_wan_vae_checkpoint(vae, tmp_path / name)
    loaded = WanVAE.build(SMALL, checkpoint=path)
    x, z = video(5, seed=12), latents(2, seed=13)
    assert torch.equal(loaded.encode(x), vae.encode(x))
    assert torch.equal(loaded.decode(z), vae.decode(z))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_bad_checkpoints_name_the_problem(tmp_path, vae):
    sd = dict(vae.state_dict())
    missing = {k: v for k, v in sd.items() if k != "decoder.head.2.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): decoder\.head\.2\.bias"):
        WanVAE.build(SMALL, checkpoint=tmp_path / "missing.pth")

    shaped = {**sd, "conv2.weight": torch.zeros(16, 16, 3, 1, 1), "extra.weight": torch.zeros(1)}
    torch.save(shaped, tmp_path / "shaped.pth")
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra\.weight; mis-shaped \(1\): "
                                              r"conv2\.weight \(16, 16, 3, 1, 1\) != \(16, 16, 1, 1, 1\)"):
        WanVAE.build(SMALL, checkpoint=tmp_path / "shaped.pth")

    full_keys = meta_model(WanVAEConfig.preset("full")).state_dict()
    assert full_keys.keys() == sd.keys()
    small_file = write_wan_vae_checkpoint(vae, tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the Wan VAE \(full\): mis-shaped \(\d+\)"):
        WanVAE.build(WanVAEConfig.preset("full"), checkpoint=small_file)

    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        WanVAE.build(SMALL, checkpoint=tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        WanVAE.build(SMALL, checkpoint=tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"write a \.pth, \.pt or \.safetensors file"):
        write_wan_vae_checkpoint(vae, tmp_path / "vae.bin")


def test_causal_conv_pads_only_the_past():
    conv = CausalConv3d(2, 2, (3, 3, 3))
    x = torch.randn(1, 2, 4, 6, 6)
    y = conv(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, :, 3] += 1  # the last frame only changes the last output
    torch.testing.assert_close(conv(x2)[:, :, :3], y[:, :, :3])
