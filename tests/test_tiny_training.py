"""Training the tiny model: the word text encoder behind the TextEncoder interface, the
teacher-forcing attention mask, a few VAE and DiT steps that reduce the loss on a fixed batch, and
`rollcast train-tiny` writing a model directory the pipeline loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rollcast.server.cli import main
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.shapes_dataset import BACKGROUNDS, VOCABULARY, ShapesDataset, render, sample_clip
from rollcast.workers.text_encoder import TextEncoder
from rollcast.workers.tiny_text import WordTextEncoder
from rollcast.workers.tiny_training import (
    LatentSet,
    TrainConfig,
    _clips_tensor,
    degrade_context,
    dit_loss,
    encode_clips,
    latent_object_mask,
    make_batch,
    new_dit,
    pick_clip,
    reconstruction_loss,
    smear_along,
    teacher_forcing_attention,
    teacher_forcing_mask,
    vae_colour_accuracy,
    vae_loss,
    vae_pixel_weight,
    with_own_context,
)
from rollcast.workers.tiny_vae import TinyVAE, TinyVAEConfig

SMALL = TrainConfig(width=64, height=64, clips=4, clip_latents=9, batch=2, window_blocks=2)


def test_word_encoder_fits_the_tiny_model_and_zeroes_past_the_prompt(tmp_path: Path) -> None:
    cfg = ModelConfig.preset("tiny")
    enc = WordTextEncoder(VOCABULARY, cfg.text_dim, cfg.text_len)
    assert isinstance(enc, TextEncoder)
    out = enc.encode(["a red circle moving left slowly on a black background", "a  RED circle zebra"])
    assert out.shape == (2, cfg.text_len, cfg.text_dim)
    assert out[0, :10].abs().sum(-1).min() > 0 and out[0, 10:].abs().sum() == 0
    assert out[1, 4:].abs().sum() == 0
    # Spacing and case do not matter; an unknown word takes the unknown row, not a colour's.
    np.testing.assert_array_equal(out[1, :3], out[0, :3])
    assert not torch.equal(out[1, 3], out[0, 3])
    back = WordTextEncoder.load(enc.save(tmp_path / "t.safetensors"))
    assert back.vocabulary == enc.vocabulary
    torch.testing.assert_close(back.encode(["a blue square"]), enc.encode(["a blue square"]))


def test_teacher_forcing_mask_is_the_cache_view() -> None:
    m = teacher_forcing_mask(blocks=3, fpb=2)  # frames: clean 0-5, noisy 6-11
    assert m[2, :4].all() and not m[2, 4:].any()  # clean block 1: clean blocks 0-1
    assert m[8, :2].all() and m[8, 8:10].all()  # noisy block 1: clean block 0 and itself
    assert not m[8, 2:8].any() and not m[8, 10:].any()  # not its own clean copy, not others
    assert m[6, 6:8].all() and not m[6, :6].any()  # noisy block 0: only itself


@pytest.mark.parametrize(("blocks", "fpb", "tpf", "batch"),
                         [(3, 2, 4, 2), (6, 3, 5, 1), (1, 3, 2, 2), (4, 1, 3, 3)])
def test_teacher_forcing_attention_equals_the_masked_full_attention(blocks: int, fpb: int, tpf: int,
                                                                     batch: int) -> None:
    g = torch.Generator().manual_seed(blocks * 10 + fpb)
    length = 2 * blocks * fpb * tpf
    q, k, v = (torch.randn(batch, length, 3, 8, generator=g) for _ in range(3))
    mask = teacher_forcing_mask(blocks, fpb).repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(teacher_forcing_attention(q, k, v, blocks, fpb, tpf), ref)


def test_latent_object_mask_marks_the_cells_an_object_covers_per_latent_frame() -> None:
    clip = sample_clip(np.random.default_rng(5), 64, 64, two_objects=0.0)
    pixels = render(clip, 0, 9)  # latents: frame 0 | frames 1-4 | frames 5-8
    pixels[5:] = BACKGROUNDS[clip.background]  # the object leaves after frame 4
    mask = latent_object_mask(pixels, BACKGROUNDS[clip.background])
    assert mask.shape == (3, 8, 8) and mask.dtype == torch.bool
    assert mask[0].any() and mask[1].any() and not mask[2].any()
    # Frame 0's object (half-extent 8 px round the middle, 32, 32 +- 2 px jitter) lies in cells 2-5.
    assert mask[0, 3:5, 3:5].all() and not mask[0, :2].any() and not mask[0, :, 6:].any()
    assert 4 <= mask[0].sum() <= 16


def test_encode_clips_marks_each_object_of_a_pair_apart() -> None:
    vae = TinyVAE(TinyVAEConfig.preset("small"))
    vae.init_weights(torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(SMALL, clips=8, clip_latents=3)
    data = encode_clips(vae, cfg)
    assert data.each.shape == (8, 2, 3, 8, 8)
    pairs = set(data.two_object_clips)
    assert pairs and len(pairs) < 8  # seed 0's first 8 clips hold both kinds
    for i in range(8):
        union = data.each[i].any(0)
        assert torch.equal(union | data.objects[i], union)  # every marked latent belongs to an object
        if i in pairs:
            assert data.each[i, 0].any() and data.each[i, 1].any()
            assert not torch.equal(data.each[i, 0], data.each[i, 1])
        else:
            assert torch.equal(data.each[i, 0], data.objects[i]) and not data.each[i, 1].any()


def test_a_few_vae_steps_reduce_the_reconstruction_loss() -> None:
    torch.manual_seed(0)
    vae = TinyVAE(TinyVAEConfig.preset("small"))
    vae.init_weights(torch.Generator().manual_seed(0))
    cfg = TrainConfig(width=64, height=64, latent_noise=0.0)
    video = _clips_tensor(ShapesDataset(0, 64, 64), [0, 1], 5)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    with torch.no_grad():
        before = vae_loss(vae, video, cfg).item()
    for _ in range(12):
        opt.zero_grad()
        vae_loss(vae, video, cfg).backward()
        opt.step()
    with torch.no_grad():
        after = vae_loss(vae, video, cfg).item()
    assert after < 0.7 * before


def test_vae_training_crops_are_object_centred_stride_aligned_windows() -> None:
    data = ShapesDataset(5, 128, 128)
    idx = list(range(40))
    crops = _clips_tensor(data, idx, 5, crop=64)
    full = _clips_tensor(data, idx, 5)
    assert crops.shape == (40, 3, 5, 64, 64) and full.shape == (40, 3, 5, 128, 128)
    for i in idx:
        # The crop is the full clip's pixels at some 8-aligned offset...
        offsets = [(y, x) for y in range(0, 65, 8) for x in range(0, 65, 8)
                   if torch.equal(full[i, :, :, y:y + 64, x:x + 64], crops[i])]
        assert offsets, i
        # ...and holds object pixels in its middle frame (a background-only crop teaches no colour).
        mid = crops[i, :, 2]
        assert (mid - mid[:, :1, :1]).abs().sum(0).gt(0.1).float().mean() > 0.05, i


def test_the_vae_loss_weights_object_pixels_and_colour_errors_up() -> None:
    frames = ShapesDataset(0, 64, 64).frames(0, 3)
    target = torch.from_numpy(frames).float().div(255).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W]
    weight = vae_pixel_weight(target, 30.0)[0, :, 0]
    bg = torch.from_numpy(np.abs(frames.astype(int) - frames[0, 0, 0]).sum(-1) == 0)
    assert weight[bg].max() == 1 and weight[~bg].min() > 10 and bg.float().mean() > 0.8
    # Decoding the object as a grey of its brightness (what the first run's VAE did) costs more
    # than an error of the same mean size that keeps its hue.
    grey = target.mean(2, keepdim=True).expand_as(target)
    size = (target - grey).abs().mean(2, keepdim=True)
    darker = (target - size).clamp(0, 1)
    cfg = TrainConfig()
    assert reconstruction_loss(grey, target, cfg) > 3 * reconstruction_loss(darker, target, cfg)
    plain = dataclasses.replace(cfg, chroma_weight=0.0)
    assert reconstruction_loss(grey, target, plain) < reconstruction_loss(grey, target, cfg)


def test_vae_colour_accuracy_scores_reconstructions_with_the_detector() -> None:
    vae = TinyVAE(TinyVAEConfig.preset("small"))
    vae.init_weights(torch.Generator().manual_seed(0))
    out = vae_colour_accuracy(vae.eval(), clips=2, frames=9)
    assert 0 <= out["colour"] < 0.5  # random weights: at best a stray frame
    assert set(out["per_colour"]) <= {"red", "green", "blue", "yellow", "cyan", "magenta", "white"}
    assert out["object_mae"] > 20


def test_a_few_dit_steps_reduce_the_flow_loss() -> None:
    g = torch.Generator().manual_seed(0)
    data = LatentSet(torch.randn(4, 16, 9, 8, 8, generator=g).half(),
                     [ShapesDataset(0).clip(i).prompt for i in range(4)],
                     torch.zeros(4, 9, 8, 8, dtype=torch.bool))
    model, text = new_dit(SMALL)
    model.train().requires_grad_(True)
    batch = make_batch(data, SMALL, 3, torch.Generator().manual_seed(1))
    assert batch.x.shape[2] == 2 * batch.target.shape[2]
    assert batch.weight.shape == (2, 1, *batch.target.shape[2:])
    # Clips of 5 blocks: the window of 2 starts at block 1, 2 or 3.
    long = LatentSet(torch.zeros(4, 16, 15, 8, 8).half(), data.prompts,
                     torch.zeros(4, 15, 8, 8, dtype=torch.bool))
    everywhere = dataclasses.replace(long, objects=torch.ones(4, 15, 8, 8, dtype=torch.bool))
    starts = set()
    for seed in range(8):
        plain = make_batch(long, SMALL, 3, torch.Generator().manual_seed(seed))
        weighted = make_batch(everywhere, SMALL, 3, torch.Generator().manual_seed(seed))
        for b in range(2):
            starts.add(plain.positions[b, 3].item() == 3)
            # The first window block has no loss unless it follows the sink (clean position 3 is 3).
            first = 0.0 if plain.positions[b, 3] != 3 else 1.0
            assert (plain.weight[b, :, 3:6] == first).all() and (plain.weight[b, :, :3] == 1).all()
            assert (plain.weight[b, :, 6:] == 1).all()
            assert (weighted.weight[b, :, :3] == 1 + SMALL.object_loss_weight).all()
            assert (weighted.weight[b, :, 3:6] == first * (1 + SMALL.object_loss_weight)).all()
            # ... and that block, only, stays the data in own-context passes.
            assert plain.given[b].tolist() == [False] * 3 + [first == 0.0] * 3 + [False] * 3
    assert starts == {True, False}
    # The model's own context replaces the clean half only.
    own = with_own_context(model, text, batch, torch.Generator().manual_seed(2))
    half = batch.x.shape[2] // 2
    assert torch.equal(own.x[:, :, half:], batch.x[:, :, half:]) and not torch.equal(own.x, batch.x)
    assert torch.equal(own.t, batch.t) and own.x.isfinite().all()
    params = [*model.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    with torch.no_grad():
        before = dit_loss(model, text, batch).item()
    for _ in range(8):
        opt.zero_grad()
        dit_loss(model, text, batch).backward()
        opt.step()
    with torch.no_grad():
        after = dit_loss(model, text, batch).item()
    assert after < 0.9 * before


def test_own_context_passes_build_an_autoregressive_rollout() -> None:
    """After k passes blocks 0..k-1 no longer change (each is a k-deep rollout already), and a
    further pass changes the blocks after them: block j's context is the model's own j blocks."""
    g = torch.Generator().manual_seed(0)
    data = LatentSet(torch.randn(2, 16, 9, 8, 8, generator=g).half(),
                     [ShapesDataset(0).clip(i).prompt for i in range(2)],
                     torch.zeros(2, 9, 8, 8, dtype=torch.bool))
    cfg = dataclasses.replace(SMALL, window_blocks=2)
    model, text = new_dit(cfg)
    model.eval()
    batch = make_batch(data, cfg, 3, torch.Generator().manual_seed(1))
    while batch.x.shape[2] != 2 * 9:  # the sink + 2 window blocks (make_batch draws the window)
        batch = make_batch(data, cfg, 3, g)
    ctx = [with_own_context(model, text, batch, torch.Generator().manual_seed(2), k).x[:, :, :9]
           for k in (1, 2, 3)]
    blocks = [slice(0, 3), slice(3, 6), slice(6, 9)]
    for k in (1, 2):
        settled, moved = blocks[:k], blocks[k]
        for b in settled:
            torch.testing.assert_close(ctx[k][:, :, b], ctx[k - 1][:, :, b])
        assert (ctx[k][:, :, moved] - ctx[k - 1][:, :, moved]).abs().max() > 1e-4


def test_own_context_keeps_a_given_window_block_as_the_data() -> None:
    """A window's first block that does not follow the sink is the rollout's starting point: it
    stays the data in every pass, and the blocks after it are predicted from it."""
    g = torch.Generator().manual_seed(0)
    long = LatentSet(torch.randn(2, 16, 15, 8, 8, generator=g).half(),
                     [ShapesDataset(0).clip(i).prompt for i in range(2)],
                     torch.zeros(2, 15, 8, 8, dtype=torch.bool))
    model, text = new_dit(SMALL)
    model.eval()
    batch = make_batch(long, SMALL, 3, g)
    while batch.x.shape[2] != 18 or not batch.given.any(1).all():  # both windows start past block 1
        batch = make_batch(long, SMALL, 3, g)
    for passes in (1, 3):
        own = with_own_context(model, text, batch, torch.Generator().manual_seed(2), passes).x[:, :, :9]
        torch.testing.assert_close(own[:, :, 3:6], batch.x[:, :, 3:6])
        assert (own[:, :, :3] - batch.x[:, :, :3]).abs().min() > 0  # the sink is the model's
        assert (own[:, :, 6:] - batch.x[:, :, 6:9]).abs().min() > 0
    # Unmarked, the same block is predicted from the sink alone.
    free = dataclasses.replace(batch, given=torch.zeros_like(batch.given))
    own = with_own_context(model, text, free, torch.Generator().manual_seed(2), 1).x[:, :, :9]
    assert (own[:, :, 3:6] - batch.x[:, :, 3:6]).abs().max() > 1e-3


@pytest.mark.slow
def test_train_tiny_writes_a_directory_the_pipeline_loads(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    assert main(["train-tiny", "--out", str(out), "--seed", "3", "--vae-steps", "2", "--dit-steps", "2",
                 "--clips", "2", "--batch", "1"]) == 0
    info = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert info["dit_steps"] == 2 and info["seed"] == 3
    record = json.loads((out / "train_tiny.json").read_text())
    assert record["seed"] == 3 and "--dit-steps 2" in record["reproduce"]
    assert main(["generate", "--checkpoint", str(out), "--prompt", "a red circle moving left slowly on a "
                 "black background", "--resolution", "64x64", "--frames", "9", "--steps", "1",
                 "--no-progress", "-o", str(tmp_path / "a.npy")]) == 0
    assert np.load(tmp_path / "a.npy").shape == (9, 64, 64, 3)
    assert main(["train-tiny", "--out", str(out)]) == 2  # refuses to overwrite


def test_a_vae_trained_alone_is_reused_by_the_dit_run(tmp_path: Path, capsys) -> None:
    vae_dir, out = tmp_path / "vae", tmp_path / "m"
    dit = ["--seed", "4", "--dit-steps", "2", "--clips", "2", "--batch", "1"]
    assert main(["train-tiny", "--out", str(vae_dir), "--vae-only", "--seed", "4", "--vae-steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["vae_steps"] == 2
    assert sorted(p.name for p in vae_dir.iterdir()) == ["taew2_1.safetensors", "train_tiny.json"]
    # A flag the phase would ignore is refused, naming it, before anything is written.
    assert main(["train-tiny", "--out", str(out), "--vae-from", str(vae_dir), "--vae-steps", "2", *dit]) == 2
    assert "--vae-steps: --vae-from reuses a trained VAE" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--vae-only", "--clips", "2"]) == 2
    assert "--clips: --vae-only trains no DiT" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--vae-only", "--smear-share", "0.5"]) == 2
    assert "--smear-share: --vae-only trains no DiT" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--vae-only", "--two-object-share", "0.5"]) == 2
    assert "--two-object-share: --vae-only trains no DiT" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--dilate-share", "0.5"]) == 2
    assert "--dilate-share: dilates a share of the smeared contexts, so it needs --smear-share" in (
        capsys.readouterr().err)
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--fade-share", "0.5"]) == 2
    assert "--fade-share: fades an object in a share of the smeared contexts, so it needs --smear-share" in (
        capsys.readouterr().err)
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--smear-each"]) == 2
    assert "--smear-each: smears each object of the smeared contexts apart, so it needs --smear-share" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["train-tiny", "--out", str(tmp_path / "w"), "--smear-share", "1.5"])
    assert "expected a number from 0 to 1, got '1.5'" in capsys.readouterr().err
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--window-blocks", "7"]) == 2
    assert "--window-blocks: must be 2 to 6 (a clip holds the sink block and 6 more), got 7" in (
        capsys.readouterr().err)
    assert main(["train-tiny", "--out", str(tmp_path / "w"), "--vae-only", "--window-blocks", "3"]) == 2
    assert "--window-blocks: --vae-only trains no DiT" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "w").exists()
    assert main(["train-tiny", "--out", str(out), "--vae-from", str(vae_dir), *dit]) == 0
    record = json.loads((out / "train_tiny.json").read_text())
    assert record["vae_from"]["path"] == str(vae_dir)
    assert record["reproduce"] == (
        "rollcast train-tiny --out VAE_DIR --seed 4 --vae-only --vae-steps 2 && rollcast train-tiny "
        "--out DIR --seed 4 --vae-from VAE_DIR --dit-steps 2 --clips 2 --batch 1")
    # The DiT's directory carries the very VAE it was trained on.
    assert (out / "taew2_1.safetensors").read_bytes() == (vae_dir / "taew2_1.safetensors").read_bytes()
    assert main(["train-tiny", "--out", str(tmp_path / "x"), "--vae-from", str(tmp_path)]) == 2
    assert "no train_tiny.json" in capsys.readouterr().err
    # A fine-tune of that model on its own rollouts: its record reproduces the base, then itself.
    tuned = tmp_path / "tuned"
    assert main(["train-tiny", "--out", str(tuned), "--finetune-from", str(out), "--seed", "5",
                 "--dit-steps", "2", "--clips", "2", "--batch", "1", "--smear-share", "0.5",
                 "--dilate-share", "0.25", "--fade-share", "0.3", "--smear-each", "--two-object-share", "0.4",
                 "--window-blocks", "3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["dit_steps"] == 2
    tuned_record = json.loads((tuned / "train_tiny.json").read_text())
    assert tuned_record["reproduce"] == (
        f"{record['reproduce']} && rollcast train-tiny --out TUNED_DIR_1 --seed 5 --finetune-from DIR "
        "--dit-steps 2 --clips 2 --batch 1 --smear-share 0.5 --dilate-share 0.25 --fade-share 0.3 "
        "--two-object-share 0.4 --smear-each --window-blocks 3")
    config = tuned_record["config"]
    assert config["own_context_after"] == 0.0 and config["smear_share"] == 0.5
    assert config["dilate_share"] == 0.25 and config["two_object_share"] == 0.4
    assert config["fade_share"] == 0.3 and config["smear_each"] is True
    assert config["window_blocks"] == 3 and config["rollout_passes"] == 4  # rollouts as deep as the window
    base_dit = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tuned / "diffusion_pytorch_model.safetensors").read_bytes() != base_dit
    assert (tuned / "taew2_1.safetensors").read_bytes() == (out / "taew2_1.safetensors").read_bytes()
    assert main(["train-tiny", "--out", str(tmp_path / "y"), "--finetune-from", str(vae_dir)]) == 2
    assert "no diffusion_pytorch_model.safetensors" in capsys.readouterr().err
    (vae_dir / "train_tiny.json").write_text("{")
    assert main(["train-tiny", "--out", str(tmp_path / "z"), "--finetune-from", str(vae_dir)]) == 2
    assert "train_tiny.json: not a train-tiny record" in capsys.readouterr().err


def _one_latent_object_set(prompts: list[str]) -> LatentSet:
    latents = torch.zeros(len(prompts), 16, 15, 8, 8)
    latents[:, :, :, 3, 4] = 1.0
    objects = torch.zeros(len(prompts), 15, 8, 8, dtype=torch.bool)
    objects[:, :, 3, 4] = True
    return LatentSet(latents.half(), prompts, objects)


def test_smear_stretches_an_object_along_its_axis_at_full_strength() -> None:
    bg = torch.tensor([0.5, -1.0]).view(2, 1, 1, 1)
    latents = bg.expand(2, 1, 8, 8).clone()
    latents[:, 0, 3, 4] = torch.tensor([2.0, 1.0])  # a one-latent object at y=3, x=4
    objects = torch.zeros(1, 8, 8, dtype=torch.bool)
    objects[0, 3, 4] = True
    out = smear_along(latents, objects, axis=-1, reach=2)
    streak = torch.zeros(8, 8, dtype=torch.bool)
    streak[3, 2:7] = True  # x 4 +- 2, same row
    assert torch.equal(out[:, 0, streak], latents[:, 0, 3, 4, None].expand(2, 5))
    assert torch.equal(out[:, 0, ~streak], bg[:, 0, 0].expand(2, 59))
    down = smear_along(latents, objects, axis=-2, reach=1)
    assert torch.equal(down[0, 0, :, 4], torch.tensor([0.5, 0.5, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5]))


@pytest.mark.parametrize(("direction", "axis"), [("left", -1), ("up", -2)])
def test_make_batch_smears_only_the_window_context_along_the_motion_axis(direction: str, axis: int) -> None:
    """With smear_share 1 every sample's window context is the smeared data; the sink, the noisy
    half and the flow target stay those of the sharp data (the same draws as smear_share 0)."""
    data = _one_latent_object_set([f"a red circle moving {direction} slowly on a black background"])
    cfg = dataclasses.replace(SMALL, batch=1, context_noise=0.0, smear_share=1.0)
    for seed in range(4):
        smeared = make_batch(data, cfg, 3, torch.Generator().manual_seed(seed))
        sharp = dataclasses.replace(cfg, smear_share=0.0)
        plain = make_batch(data, sharp, 3, torch.Generator().manual_seed(seed))
        f = plain.target.shape[2]
        torch.testing.assert_close(smeared.target, plain.target)
        torch.testing.assert_close(smeared.x[:, :, f:], plain.x[:, :, f:])
        torch.testing.assert_close(smeared.x[:, :, :3], plain.x[:, :, :3])  # the sink block
        window = smeared.x[0, 0, 3:f]
        along = window[:, 3, 3:6] if axis == -1 else window[:, 2:5, 4]
        across = window[:, 2:5, 4] if axis == -1 else window[:, 3, 3:6]
        assert (along == 1).all()  # reach >= 1 each way along the axis
        assert (across == 1).sum() == window.shape[0]  # only the object's own cell across it
        assert (plain.x[0, 0, 3:f] == 1).sum() == window.shape[0]


def test_make_batch_dilates_the_window_context_on_both_axes() -> None:
    """With dilate_share 1 every smeared sample is bloated instead: the object's cell grows by
    1..max_dilate latents along both axes (a rectangle), the sink and the targets stay sharp."""
    data = _one_latent_object_set(["a red circle moving left slowly on a black background"])
    cfg = dataclasses.replace(SMALL, batch=1, context_noise=0.0, smear_share=1.0, dilate_share=1.0)
    reaches = set()
    for seed in range(6):
        bloated = make_batch(data, cfg, 3, torch.Generator().manual_seed(seed))
        f = bloated.target.shape[2]
        assert (bloated.x[0, 0, :3, 3, 4] == 1).all() and (bloated.x[0, 0, :3] == 1).sum() == 3  # sink
        for frame in bloated.x[0, 0, 3:f]:
            rows, cols = torch.nonzero(frame == 1, as_tuple=True)
            ry, rx = 3 - int(rows.min()), 4 - int(cols.min())
            assert int(rows.max()) - 3 == ry and int(cols.max()) - 4 == rx  # centred on the object
            assert 1 <= ry <= cfg.max_dilate and 1 <= rx <= cfg.max_dilate
            assert len(rows) == (2 * ry + 1) * (2 * rx + 1)  # the whole rectangle, at full strength
            reaches.add((rx, ry))
        sharp = make_batch(data, dataclasses.replace(cfg, smear_share=0.0, dilate_share=0.0),
                           3, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(bloated.target, sharp.target)
        torch.testing.assert_close(bloated.x[:, :, f:], sharp.x[:, :, f:])
    assert len(reaches) > 1  # the reach is drawn, not fixed


def test_two_object_share_draws_two_object_clips() -> None:
    one = "a red circle moving left slowly on a black background"
    two = "a red circle moving left slowly and a cyan square moving up quickly on a gray background"
    data = _one_latent_object_set([one, one, two, one, one, one, two, one])
    assert data.two_object_clips == [2, 6]
    gen = torch.Generator().manual_seed(0)
    always = dataclasses.replace(SMALL, two_object_share=1.0)
    assert {pick_clip(data, always, gen) for _ in range(40)} == {2, 6}
    # Share 0 is the uniform draw it always was (the same random numbers), over every clip.
    uniform = [pick_clip(data, SMALL, torch.Generator().manual_seed(s)) for s in range(60)]
    assert uniform == [int(torch.randint(8, (1,), generator=torch.Generator().manual_seed(s)))
                       for s in range(60)]
    assert set(uniform) == set(range(8))
    half = dataclasses.replace(SMALL, two_object_share=0.5)
    drawn = [pick_clip(data, half, gen) for _ in range(400)]
    share = sum(i in (2, 6) for i in drawn) / len(drawn)
    assert 0.55 < share < 0.70  # half the draws, plus the uniform half's quarter


def _pair_set(prompt: str) -> LatentSet:
    """One clip whose two objects each sit on one latent cell, (3, 2) and (5, 6) (x, y)."""
    latents = torch.zeros(1, 16, 15, 8, 8)
    each = torch.zeros(1, 2, 15, 8, 8, dtype=torch.bool)
    for j, (x, y) in enumerate(((3, 2), (5, 6))):
        latents[0, :, :, y, x] = 1.0 + j
        each[0, j, :, y, x] = True
    return LatentSet(latents.half(), [prompt], each.any(1), each)


def test_degrade_context_smears_each_object_of_a_pair_along_its_own_axis() -> None:
    prompt = "a red circle moving left slowly and a blue square moving up quickly on a black background"
    data = _pair_set(prompt)
    cfg = dataclasses.replace(SMALL, smear_each=True, max_smear=1)
    out = degrade_context(data.latents[0].float(), data.objects[0], data.each[0], prompt, cfg,
                          torch.Generator().manual_seed(0))
    marked = out[0, 0] != 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2, 2:5] = True  # the first object along x
    expected[5:8, 5] = True  # the second along y
    assert torch.equal(marked, expected)
    assert out[0, 0, 2, 2] == 1.0 and out[0, 0, 7, 5] == 2.0  # each streak keeps its own object's value
    # Without smear_each both go along the first object's axis (x), as runs 13-19 trained.
    both = degrade_context(data.latents[0].float(), data.objects[0], data.each[0], prompt,
                           dataclasses.replace(cfg, smear_each=False), torch.Generator().manual_seed(0))
    along_x = torch.zeros(8, 8, dtype=torch.bool)
    along_x[2, 2:5] = along_x[6, 4:7] = True
    assert torch.equal(both[0, 0] != 0, along_x)


def test_degrade_context_fades_one_object_of_a_pair_toward_the_background() -> None:
    prompt = "a red circle moving left slowly and a blue square moving up quickly on a black background"
    data = _pair_set(prompt)
    cfg = dataclasses.replace(SMALL, smear_each=True, fade_share=1.0, min_fade=0.3)
    faded = set()
    for seed in range(8):
        out = degrade_context(data.latents[0].float(), data.objects[0], data.each[0], prompt, cfg,
                              torch.Generator().manual_seed(seed))
        a, b = float(out[0, 0, 2, 3]), float(out[0, 0, 6, 5])
        assert (out[0, 0] != 0).sum() == 2  # nothing moved or grew
        assert (a == 1.0) != (b == 2.0)  # exactly one object fades ...
        j, kept = (0, a) if a != 1.0 else (1, b / 2)
        assert 0.0 <= kept <= 0.7 + 1e-6  # ... to at most 1 - min_fade of its contrast
        faded.add(j)
    assert faded == {0, 1}
    # A lone object never fades: its context is smeared as before.
    lone = _one_latent_object_set(["a red circle moving left slowly on a black background"])
    out = degrade_context(lone.latents[0].float(), lone.objects[0], lone.each[0], lone.prompts[0], cfg,
                          torch.Generator().manual_seed(0))
    assert out[0, 0, 3, 4] == 1.0 and (out[0, 0] != 0).sum() > 1
