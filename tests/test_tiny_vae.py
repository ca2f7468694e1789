"""The tiny (TAEHV) VAE: taew2_1 shapes and keys, Wan frame counts, streaming == whole sequence,
checkpoints."""

from __future__ import annotations

import re

import pytest
import torch

from rollcast.workers.checkpoint import CheckpointError
from rollcast.workers.tiny_vae import (
    MemBlock,
    TinyDecodeState,
    TinyEncodeState,
    TinyVAE,
    TinyVAEConfig,
    write_tiny_vae_checkpoint,
)
from rollcast.workers.vae import StreamingVAE, build_vae, video_frames

H = W = 32  # pixels; latents are 4x4
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def vae() -> TinyVAE:
    return TinyVAE.build(TinyVAEConfig.preset("small"), seed=1)


def pixels(t: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, t, H, W, generator=g) * 2 - 1


def latents(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, n, H // 8, W // 8, generator=g)


def encode_in_chunks(vae: TinyVAE, video: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assert sum(sizes) == video.shape[2]
    state, out, start = vae.encode_state(), [], 0
    for size in sizes:
        z = vae.encode_chunk(video[:, :, start:start + size], state)
        assert z.shape[2] == (1 + (size - 1) // 4 if start == 0 else size // 4)
        out.append(z)
        start += size
    return torch.cat(out, 2)


def decode_in_chunks(vae: TinyVAE, z: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assert sum(sizes) == z.shape[2]
    state, out, start = vae.decode_state(), [], 0
    for size in sizes:
        x = vae.decode_chunk(z[:, :, start:start + size], state)
        assert x.shape[2] == (4 * size - 3 if start == 0 else 4 * size)
        out.append(x)
        start += size
    return torch.cat(out, 2)


# -- shapes, keys, presets ----------------------------------------------------------------------------


def test_full_preset_is_taew2_1():
    with torch.device("meta"):
        model = TinyVAE(TinyVAEConfig.preset("full"))
    sd = model.state_dict()
    assert len(sd) == 128
    assert sum(v.numel() for v in sd.values()) == 11_315_539
    assert sum(v.numel() for k, v in sd.items() if k.startswith("encoder.")) == 1_470_928
    layout = re.compile(r"^(encoder|decoder)\.\d+\.(weight|bias|conv\.weight|conv\.[024]\.(weight|bias))$")
    assert [k for k in sd if not layout.match(k)] == []
    expected = {  # spot checks against taehv.py's nn.Sequential indices
        "encoder.0.weight": (64, 3, 3, 3),
        "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool stride 2
        "encoder.3.weight": (64, 64, 3, 3),
        "encoder.4.conv.0.weight": (64, 128, 3, 3),
        "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool stride 1
        "encoder.16.conv.4.bias": (64,),
        "encoder.17.weight": (16, 64, 3, 3),
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3),
        "decoder.22.bias": (3,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "decoder.8.bias" not in sd and "encoder.3.bias" not in sd  # bias-free like taehv


def test_small_preset_has_the_same_layout_and_presets_are_checked():
    with torch.device("meta"):
        full = TinyVAE(TinyVAEConfig.preset("full")).state_dict()
        small = TinyVAE(TinyVAEConfig.preset("small")).state_dict()
    assert list(small) == list(full)
    assert sum(v.numel() for v in small.values()) < 11_315_539 // 40
    with pytest.raises(ValueError, match=r"'huge'.*\['full', 'small'\]"):
        TinyVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="product is 4"):
        TinyVAEConfig(encoder_time_strides=(2, 2, 2))


def test_interface_and_factory(vae):
    assert isinstance(vae, StreamingVAE)
    assert (vae.kind, vae.z_dim, vae.temporal_stride, vae.spatial_stride) == ("tiny", 16, 4, 8)
    built = build_vae("tiny", "small", seed=1)
    assert isinstance(built, TinyVAE) and built.config == vae.config
    z = latents(2)
    assert torch.equal(built.decode(z), vae.decode(z))  # same seed -> same weights
    assert not torch.equal(TinyVAE.build(vae.config, seed=2).decode(z), vae.decode(z))
    assert isinstance(vae.encode_state(), TinyEncodeState)
    assert isinstance(vae.decode_state(), TinyDecodeState)


def test_memblock_reads_the_current_frame_first():
    """taew2_1's first MemBlock conv takes [current frame, previous frame] on its input channels."""
    block = MemBlock(4, 4)
    with torch.no_grad():
        block.conv[0].weight[:, 4:] = 0  # drop the memory half
    x, past = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x, past), block(x, torch.zeros_like(past)))
    assert not torch.allclose(block(x, past), block(past, past))


# -- frame counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
def test_frame_counts(vae, n):
    x = vae.decode(latents(n))
    assert x.shape == (1, 3, video_frames(n), H, W) and x.is_contiguous()
    z = vae.encode(pixels(video_frames(n)))
    assert z.shape == (1, 16, n, H // 8, W // 8) and z.is_contiguous()


def test_outputs_are_finite_and_in_range(vae):
    x = vae.decode(latents(3))
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert 0.1 < x.std() < 0.8 and (x.abs() == 1).float().mean() < 0.15  # varied, mostly unclamped
    assert vae.decode(latents(3) * 100).abs().max() <= 1  # clamped however large the latents
    z = vae.encode(pixels(9))
    assert torch.isfinite(z).all() and 0.3 < z.std() < 3 and z.mean().abs() < 0.5


def test_bad_frame_counts_are_refused(vae):
    for t in (0, 2, 4, 8):
        with pytest.raises(ValueError, match=r"1 \+ 4k"):
            vae.encode(pixels(t) if t else pixels(1)[:, :, :0])
        with pytest.raises(ValueError, match=r"1 \+ 4k"):
            vae.encode_chunk(pixels(t) if t else pixels(1)[:, :, :0], vae.encode_state())
    state = vae.encode_state()
    vae.encode_chunk(pixels(1), state)
    for t in (1, 3, 5, 6):
        with pytest.raises(ValueError, match="groups of 4"):
            vae.encode_chunk(pixels(t), state)
    assert state.frames_in == 1  # refused calls leave the state alone
    with pytest.raises(ValueError, match="at least 1 latent"):
        vae.decode_chunk(latents(1)[:, :, :0], vae.decode_state())
    with pytest.raises(ValueError, match=r"latents \[B, 16"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 30, 32))


def test_a_state_keeps_its_geometry(vae):
    state = vae.decode_state()
    vae.decode_chunk(latents(1), state)
    with pytest.raises(ValueError, match="was started with"):
        vae.decode_chunk(latents(1, batch=2), state)
    enc = vae.encode_state()
    vae.encode_chunk(pixels(1), enc)
    with pytest.raises(ValueError, match="was started with"):
        vae.encode_chunk(torch.zeros(1, 3, 4, 16, 32), enc)


# -- causality and alignment with Wan's grouping ------------------------------------------------------


def test_encoder_groups_frames_like_wan(vae):
    """Latent 0 sees frame 0 only, latent i > 0 frames 4i-3 .. 4i (and, through memory, earlier)."""
    video = pixels(9)
    z = vae.encode(video)
    assert torch.allclose(vae.encode(video[:, :, :1]), z[:, :, :1], **TOL)
    assert torch.allclose(vae.encode(video[:, :, :5]), z[:, :, :2], **TOL)
    changed = video.clone()
    changed[:, :, 5] = -changed[:, :, 5]  # first frame of latent 2
    z2 = vae.encode(changed)
    assert torch.equal(z2[:, :, :2], z[:, :, :2])
    assert not torch.allclose(z2[:, :, 2], z[:, :, 2], atol=1e-3)


def test_decoder_is_causal_with_the_trim(vae):
    z = latents(3)
    x = vae.decode(z)
    changed = z.clone()
    changed[:, :, 1] += 1.0
    x2 = vae.decode(changed)
    assert torch.equal(x2[:, :, :1], x[:, :, :1])  # frame 0 comes from latent 0 alone
    for f in range(1, 5):  # frames 1..4 come from latent 1
        assert not torch.allclose(x2[:, :, f], x[:, :, f], atol=1e-3), f


def test_memory_carries_across_chunks(vae):
    """Without the state's memory the next chunk would differ, so the equivalence tests can fail."""
    z = latents(3)
    state = vae.decode_state()
    vae.decode_chunk(z[:, :, :1], state)
    with_memory = vae.decode_chunk(z[:, :, 1:2], state)
    fresh = vae.decode_state()
    fresh.latents_in = 1  # skip the trim, but start with empty memory
    without = vae.decode_chunk(z[:, :, 1:2], fresh)
    assert not torch.allclose(with_memory, without, atol=1e-3)
    enc = vae.encode_state()
    video = pixels(5)
    vae.encode_chunk(video[:, :, :1], enc)
    fresh_enc = vae.encode_state()
    fresh_enc.frames_in = 1
    assert not torch.allclose(vae.encode_chunk(video[:, :, 1:], enc),
                              vae.encode_chunk(video[:, :, 1:], fresh_enc), atol=1e-3)


# -- streaming == whole sequence ----------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 4, 4, 4, 4, 4], [9, 4, 8], [21]])
def test_encode_in_chunks_equals_whole_video(vae, sizes):
    video = pixels(21, seed=3)
    whole = vae.encode(video)
    assert whole.shape[2] == 6
    assert torch.allclose(encode_in_chunks(vae, video, sizes), whole, **TOL)


@pytest.mark.parametrize("sizes", [[1] * 6, [1, 3, 2], [3, 1, 2], [6]])
def test_decode_in_chunks_equals_whole_sequence(vae, sizes):
    z = latents(6, seed=4)
    whole = vae.decode(z)
    assert whole.shape[2] == 21
    assert torch.allclose(decode_in_chunks(vae, z, sizes), whole, **TOL)


def test_batch_rows_are_independent(vae):
    video = pixels(9, batch=2, seed=5)
    z = vae.encode(video)
    z_rows = torch.cat([vae.encode(video[i:i + 1]) for i in range(2)], 0)
    assert torch.allclose(z, z_rows, **TOL)
    assert torch.allclose(encode_in_chunks(vae, video, [1, 4, 4]), z, **TOL)
    x = vae.decode(z)
    x_rows = torch.cat([vae.decode(z[i:i + 1]) for i in range(2)], 0)
    assert torch.allclose(x, x_rows, **TOL)
    assert torch.allclose(decode_in_chunks(vae, z, [1, 2]), x, **TOL)


def test_state_counters(vae):
    enc, dec = vae.encode_state(), vae.decode_state()
    assert not enc.started and not dec.started
    z = torch.cat([vae.encode_chunk(pixels(5), enc), vae.encode_chunk(pixels(8, seed=1), enc)], 2)
    assert (enc.frames_in, enc.latents_out) == (13, 4)
    vae.decode_chunk(z[:, :, :2], dec)
    vae.decode_chunk(z[:, :, 2:], dec)
    assert (dec.latents_in, dec.frames_out) == (4, 13)


# -- checkpoints --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, vae, suffix):
    path = write_tiny_vae_checkpoint(vae, tmp_path / f"taew2_1{suffix}")
    loaded = TinyVAE.build(vae.config, checkpoint=path, seed=99)
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    z = latents(2)
    assert torch.equal(loaded.decode(z), vae.decode(z))
    assert torch.equal(loaded.encode(pixels(5)), vae.encode(pixels(5)))


def test_checkpoint_is_cast_to_the_requested_dtype(tmp_path, vae):
    path = write_tiny_vae_checkpoint(vae, tmp_path / "taew2_1.safetensors")
    loaded = TinyVAE.build(vae.config, checkpoint=path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    x = loaded.decode(latents(2))
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()


def test_bad_checkpoints_are_named(tmp_path, vae):
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    del sd["decoder.7.conv.weight"]
    sd["decoder.22.weight"] = torch.zeros(3, 4, 3, 3)
    sd["decoder.99.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        TinyVAE.build(vae.config, checkpoint=path)
    msg = str(err.value)
    assert "missing (1): decoder.7.conv.weight" in msg
    assert "unexpected (1): decoder.99.weight" in msg
    assert "mis-shaped (1): decoder.22.weight (3, 4, 3, 3) != (3, 12, 3, 3)" in msg
    # A small-preset file does not fit the full model (and says so).
    with pytest.raises(CheckpointError, match="mis-shaped"):
        small_file = write_tiny_vae_checkpoint(vae, tmp_path / "s.pth")
        TinyVAE.build(TinyVAEConfig.preset("full"), checkpoint=small_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: not a readable"):
        TinyVAE.build(vae.config, checkpoint=garbage)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        TinyVAE.build(vae.config, checkpoint=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match=r"\.pth, \.pt or \.safetensors"):
        write_tiny_vae_checkpoint(vae, tmp_path / "weights.bin")
