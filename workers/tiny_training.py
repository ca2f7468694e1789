"""Training the tiny default model on the shapes dataset, on CPU: VAE, then text encoder + DiT.

1. VAE (the `small` TinyVAE): reconstruction of dataset clips through the same whole-sequence
   passes `encode`/`decode` run (front padding, MemBlock memory, trim), with object pixels weighted
   up by their distance from the background (a small object on a plain background is otherwise
   cheap to erase), a chroma term (a grey blob of the object's brightness is otherwise a cheap
   minimum: the first run's VAE decoded every colour as grey), a pull of the latents
   toward zero mean and unit variance (the DiT's noise scale) and noise on the decoder's input (it
   must decode the DiT's imperfect latents, not only the encoder's).
2. Latents: a fixed set of clips is encoded once (fp16 in memory); DiT samples are windows of them.
3. DiT + word text encoder, flow matching with teacher forcing through the real block-causal
   attention. A sample holds the sink block (block 0) and `window_blocks` consecutive blocks from
   anywhere in a clip, each twice: clean (t = 0, what the cache holds after Self-Forcing's context
   pass) and noised at its own timestep. A clean block attends to the clean blocks up to itself,
   a noisy block to the clean blocks before it and to itself, which is exactly what a block sees
   through the rolling cache at inference. Window blocks sit at RoPE positions shifted by a random
   offset (up to `max_position_offset` latent frames), so the sink-to-window distances of a long
   stream with baked RoPE are in the training distribution. A window's first block has no loss
   unless it follows the sink (it never lacks its predecessor at inference). Late in training half
   the batches swap the clean context for the model's own rollouts (`with_own_context`).
4. Optionally (`finetune_tiny`), a Self-Forcing-style fine-tune of a trained model: most batches
   on its own rollouts as deep as the window, from the first step, at a lower learning rate.

Timesteps follow the sampler's shifted schedule, with extra weight on t = 1000 (the one-step
sampler's only step). Clean context is lightly noised: at inference it is the model's own output.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.checkpoint import load_checkpoint, synthetic_model, write_checkpoint
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.model_files import BASE_DIT_PREFIX, TINY_VAE_FILES, WORD_TEXT_ENCODER_FILE
from rollcast.workers.prompt_kv import PromptBatch
from rollcast.workers.rope import apply_rope
from rollcast.workers.shape_detector import score_video
from rollcast.workers.shapes_dataset import (
    BACKGROUNDS,
    DIRECTIONS,
    VOCABULARY,
    ShapesDataset,
    parse_prompt,
    shape_mask,
    trajectory,
)
from rollcast.workers.tiny_text import WordTextEncoder
from rollcast.workers.tiny_vae import (
    FRAMES_TO_TRIM,
    TinyVAE,
    TinyVAEConfig,
    run_sequence,
    write_tiny_vae_checkpoint,
)

Log = Callable[[dict[str, object]], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    width: int = 128
    height: int = 128
    # VAE
    vae_steps: int = 1500
    vae_batch: int = 8
    vae_frames: int = 9  # 1 + 4k: three latents per clip
    vae_crop: int | None = 64  # square crops around an object (convs are translation-equivariant; 8x cheaper)
    vae_lr: float = 1.5e-3  # 3e-3 learnt hue slower, 6e-3 not at all (docs/quality.md)
    object_weight: float = 30.0  # see vae_pixel_weight
    chroma_weight: float = 3.0  # see reconstruction_loss
    latent_noise: float = 0.1
    vae_check_every: int = 150  # steps between held-out colour checks over the last 40 % (train_vae)
    # latent set
    clips: int = 300
    clip_latents: int = 21  # a whole number of blocks, one more than sink + window
    # DiT
    dit_steps: int = 3000
    batch: int = 4
    # Most consecutive blocks after the sink: the last then sees the sink and 5 blocks before it,
    # as through the self-forcing cache (window 18 latent frames, the current block included).
    window_blocks: int = 6
    lr: float = 1e-3
    warmup: int = 50
    ema: float = 0.99
    shift: float = 5.0
    one_step_share: float = 0.5  # samples whose blocks sit at t = 1000 (the 1-step sampler's)
    context_noise: float = 0.05  # max σ of the noise on the clean context
    # Extra flow-loss weight on latents an object touches (~8 % of them). 8 with the mask dilated
    # by a latent (22 % marked) bloated objects into large blobs: under uncertainty a weighted
    # loss prefers object colour (docs/quality.md, session 8).
    object_loss_weight: float = 3.0
    own_context_share: float = 0.5  # batches whose context is the model's own 1-step prediction
    # Share of the DiT's steps before own-context batches start: Self-Forcing rolls out a model
    # already trained on true context; a fresh model's own blocks are position-less streaks, and
    # training on them from step 1 rewards ignoring the context (run 5, docs/quality.md).
    own_context_after: float = 0.6
    # Most no-gradient passes building that context (drawn 1..n per batch): pass k re-predicts every
    # block from pass k-1's outputs, so block j's context is the model's own j-deep rollout for
    # j <= k, the compounding errors a stream's cache holds (Self-Forcing's exposure), in k passes.
    rollout_passes: int = 3
    max_position_offset: int = 1300  # latent frames (5000 video frames ≈ 1250)
    # Share of samples whose window context (not the sink) is smeared along the first object's
    # axis of motion while the target stays the sharp data. Long streams fail by growing the
    # object into a streak along that axis (the L2 optimum where the position is uncertain), and
    # a streak in the cache begets a longer one; no rollout as short as a clip ever shows one, so
    # this teaches the way back to a sharp object at the streak's centre (docs/quality.md, "What
    # the lost frames look like").
    # 0 draws no extra random numbers, so earlier runs' fixed-step lines reproduce unchanged.
    smear_share: float = 0.0
    max_smear: int = 4  # latents each way (an object's radius is 2)
    # Share of the smeared samples dilated on both axes instead (1..max_dilate latents each way):
    # long streams also fail by bloating objects, two-object prompts most, into blobs the detector
    # no longer calls compact (docs/quality.md, run 15). 0 draws no extra random numbers.
    dilate_share: float = 0.0
    max_dilate: int = 2
    # Two-object clips, when smeared: each object along its own axis of motion (False: both along
    # the first's, as runs 13-19 trained). Pairs fail most by the second object's streak (run 19).
    smear_each: bool = False
    # Share of the smeared two-object samples whose context instead fades one object (drawn at
    # random) toward the background by min_fade..1: the other way pairs fail, one object dimming
    # away (run 19, docs/quality.md). 0 draws no extra random numbers.
    fade_share: float = 0.0
    min_fade: float = 0.3
    # Share of samples drawn from the two-object clips (a quarter of the dataset, and the prompts
    # that score worst: merged, bloated pairs). 0: clips drawn uniformly, no extra random numbers.
    two_object_share: float = 0.0
    # Wall-clock limits (seconds; None: only the step counts stop training).
    vae_seconds: float | None = None
    dit_seconds: float | None = None


RECORD_FILE = "train_tiny.json"  # beside the weights: how they were made
VAE_SELECTION_SEED = 4243  # held-out clips that pick the VAE snapshot; 4242 reports its accuracy


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to 10%. Flat during warm-up, so a time-limited run, which fixes
    its step count from the speed of its first steps, follows the same schedule as a rerun given
    that step count."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class StepBudget:
    """Total steps: given, or (with a time limit) fixed after `calibrate` steps from their speed.
    Fixed once, at the end of the warm-up, because lr_factor after the warm-up depends on the
    total: a later re-estimate would give the steps between a schedule that the record's
    fixed-step `reproduce` line does not follow. A warm-up that draws short windows can misjudge
    the speed by half (run 12), which stretches the run, not its reproducibility."""

    def __init__(self, steps: int, seconds: float | None, calibrate: int) -> None:
        self.total = steps
        self.seconds = seconds
        self.calibrate = calibrate
        self.t0 = time.monotonic()

    def update(self, done: int) -> None:
        if self.seconds is not None and done == self.calibrate:
            per_step = (time.monotonic() - self.t0) / done
            self.total = min(self.total, max(done, int(self.seconds / per_step)))


def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny")


def _clips_tensor(dataset: ShapesDataset, indices: list[int], frames: int, crop: int | None = None) -> Tensor:
    """Pixels [B, 3, T, H, W] in [-1, 1] of dataset clips, starting at a random-but-seeded frame;
    with `crop`, a crop x crop window around one object's middle-frame position, jittered by up to
    a quarter of the crop (multiples of 8, the VAE's spatial stride)."""
    out = []
    for i in indices:
        rng = np.random.default_rng([dataset.seed, i, 7])
        start = int(rng.integers(0, 200))
        pixels = dataset.frames(i, frames, start)
        if crop is not None and crop < min(dataset.width, dataset.height):
            clip = dataset.clip(i)
            which = int(rng.integers(len(clip.objects)))
            centre, _ = trajectory(clip, which, np.array([start + frames // 2]))
            jitter = rng.integers(-crop // 4, crop // 4 + 1, 2)
            x0, y0 = (int(c) for c in np.round((centre[0] + jitter - crop / 2) / 8) * 8)
            x0 = min(max(x0, 0), dataset.width - crop)
            y0 = min(max(y0, 0), dataset.height - crop)
            pixels = pixels[:, y0:y0 + crop, x0:x0 + crop]
        out.append(torch.from_numpy(np.ascontiguousarray(pixels)))
    x = torch.stack(out).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1


# -- VAE --------------------------------------------------------------------------------------------


def vae_forward(vae: TinyVAE, video: Tensor, latent_noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """Differentiable whole-sequence encode + decode (the passes `encode`/`decode` run without
    gradients): pixels [B, 3, 1 + 4k, H, W] in [-1, 1] -> (reconstruction in [0, 1] laid out
    [B, T, 3, H, W], latents [B*(1+k), z, h, w])."""
    x, _ = vae._pixels_in(video, "train")
    batch = x.shape[0]
    z = run_sequence(vae.encoder, vae._fold(vae._front_pad(x)), batch)
    noisy = z + latent_noise * torch.randn_like(z) if latent_noise else z
    y = run_sequence(vae.decoder, noisy, batch)
    y = y.reshape(batch, -1, *y.shape[1:])[:, FRAMES_TO_TRIM:]
    return y, z


def vae_pixel_weight(target: Tensor, object_weight: float) -> Tensor:
    """Per-pixel loss weight [B, T, 1, H, W] of target frames [B, T, 3, H, W] in [0, 1]:
    1 + `object_weight` x (L1 distance to the nearest background colour, capped at 1). Objects are
    ~5 % of the pixels; without the weight the flat background dominates the loss."""
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=target.dtype, device=target.device) / 255
    dist = (target[..., None, :, :, :] - bg.view(1, 1, -1, 3, 1, 1)).abs().sum(3).amin(2)
    return 1 + object_weight * dist.clamp(max=1.0)[:, :, None]


def reconstruction_loss(y: Tensor, target: Tensor, cfg: TrainConfig) -> Tensor:
    """Weighted MSE plus a weighted chroma term (the error less its per-pixel grey component), for
    frames [B, T, 3, H, W] in [0, 1]. With a plain (even object-weighted) MSE the small VAE settles
    on a grey blob of the object's brightness: every object colour decoded as grey."""
    weight = vae_pixel_weight(target, cfg.object_weight)
    diff = y - target
    rec = (weight * diff**2).mean()
    if cfg.chroma_weight:
        chroma = diff - diff.mean(2, keepdim=True)
        rec = rec + cfg.chroma_weight * (weight * chroma**2).mean()
    return rec


def vae_loss(vae: TinyVAE, video: Tensor, cfg: TrainConfig) -> Tensor:
    y, z = vae_forward(vae, video, cfg.latent_noise)
    target = ((video + 1) / 2).permute(0, 2, 1, 3, 4)
    stats = z.mean() ** 2 + (z.std() - 1) ** 2
    return reconstruction_loss(y, target, cfg) + 0.01 * stats


def train_vae(cfg: TrainConfig, log: Log | None = None) -> tuple[TinyVAE, int]:
    """The trained VAE (eval mode, frozen) and the steps it ran (a time limit may cut them).

    The VAE returned is an EMA of the weights, picked among snapshots taken every
    `vae_check_every` steps over the last 40 % of training by held-out colour accuracy
    (`VAE_SELECTION_SEED`, not the seed reported). One colour can be lost late in training: the
    last-step weights of one run scored 0.555 (blue 0.0) where the same recipe had scored 0.986."""
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = TinyVAE(TinyVAEConfig.preset("small"))
    vae.init_weights(gen)
    vae.train().requires_grad_(True)
    ema = copy.deepcopy(vae).eval().requires_grad_(False)
    params, ema_params = list(vae.parameters()), list(ema.parameters())
    data = ShapesDataset(cfg.seed, cfg.width, cfg.height)
    opt = torch.optim.Adam(params, lr=cfg.vae_lr)
    # Warm-up as long as the speed calibration, so a time-capped run and its fixed-step rerun follow
    # the same schedule (lr_factor). The session-7 runs in docs/quality.md used a 10-step warm-up.
    warmup = min(30, cfg.vae_steps)
    budget = StepBudget(cfg.vae_steps, cfg.vae_seconds, calibrate=warmup)
    t0 = time.monotonic()
    best: tuple[tuple[float, float], dict[str, Tensor]] | None = None
    step = 0
    while step < budget.total:
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * lr_factor(step, budget.total, warmup)
        idx = [1_000_000 + step * cfg.vae_batch + j for j in range(cfg.vae_batch)]
        loss = vae_loss(vae, _clips_tensor(data, idx, cfg.vae_frames, cfg.vae_crop), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema, (1 + step) / (10 + step)))
        step += 1
        budget.update(step)
        if log and (step % 50 == 1 or step == budget.total):
            log({"phase": "vae", "step": step, "of": budget.total, "loss": round(loss.item(), 5),
                 "seconds": round(time.monotonic() - t0, 1)})
        last = step == budget.total
        if last or (step >= 0.6 * budget.total and step % cfg.vae_check_every == 0):
            check = vae_colour_accuracy(ema, seed=VAE_SELECTION_SEED)
            colour, mae = check["colour"], check["object_mae"]
            assert isinstance(colour, float) and isinstance(mae, float)
            key = (colour, -mae)
            if best is None or key > best[0]:
                best = key, copy.deepcopy(ema.state_dict())
            if log:
                log({"phase": "vae_check", "step": step, **check})
    assert best is not None
    ema.load_state_dict(best[1])
    return ema, step


@torch.no_grad()
def vae_colour_accuracy(vae: TinyVAE, clips: int = 28, frames: int = 33,
                        seed: int = 4242) -> dict[str, object]:
    """The detector's colour accuracy on VAE reconstructions (encode + decode) of held-out clips
    (dataset `seed`, 128x128): overall, per prompted colour, and the mean absolute error (0-255) on
    object pixels. Ground-truth clips score 0.999; a VAE that loses hue scores 0, and then so does
    any DiT trained on its latents."""
    data = ShapesDataset(seed, 128, 128)
    scores, per_colour, object_err = [], {}, []
    for i in range(clips):
        clip = data.clip(i)
        truth = data.frames(i, frames)
        video = torch.from_numpy(truth)[None].permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        out = vae.decode(vae.encode(video))[0].permute(1, 2, 3, 0)
        rec = ((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        score = score_video(rec, clip).color
        scores.append(score)
        for obj in clip.objects:
            per_colour.setdefault(obj.color, []).append(score)
        obj_px = np.abs(truth.astype(int) - truth[0, 0, 0].astype(int)).sum(-1) > 30
        object_err.append(np.abs(rec.astype(float) - truth)[obj_px].mean())
    return {"colour": round(float(np.mean(scores)), 3),
            "per_colour": {c: round(float(np.mean(v)), 2) for c, v in sorted(per_colour.items())},
            "object_mae": round(float(np.mean(object_err)), 1)}


# -- latent set ---------------------------------------------------------------------------------------


@dataclass
class LatentSet:
    latents: Tensor  # [N, z, L, h, w] float16
    prompts: list[str]
    objects: Tensor  # [N, L, h, w] bool: latents an object touches (see latent_object_mask)
    # [N, 2, L, h, w] bool: the latents each object's shape covers, occluded or not (the second
    # all False for a lone object), for degrading one object of a pair (`degrade_context`).
    # None: every clip's `objects` as one lone object.
    each: Tensor | None = None

    def __post_init__(self) -> None:
        if self.each is None:
            self.each = torch.stack([self.objects, torch.zeros_like(self.objects)], 1)

    @functools.cached_property
    def two_object_clips(self) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if len(parse_prompt(p).objects) == 2]


def latent_object_mask(frames: np.ndarray, background: tuple[int, int, int], stride: int = 8) -> Tensor:
    """Which latents of a clip an object touches, [L, h, w] bool, for pixels uint8 [1 + 4k, H, W, 3]."""
    return latent_cells(np.abs(frames.astype(np.int16) - np.array(background, np.int16)).sum(-1) > 30, stride)


def latent_cells(obj: np.ndarray, stride: int = 8) -> Tensor:
    """The latents [L, h, w] bool a pixel mask [1 + 4k, H, W] touches: latent frame 0 holds pixel
    frame 0 and latent l > 0 frames 4l-3 .. 4l (the VAE's temporal grouping); a latent is marked
    when any marked pixel falls in its `stride` x `stride` cell."""
    grouped = np.concatenate([obj[:1], obj[1:].reshape(-1, 4, *obj.shape[1:]).any(1)])
    t, h, w = grouped.shape
    return torch.from_numpy(grouped.reshape(t, h // stride, stride, w // stride, stride).any((2, 4)))


@torch.no_grad()
def encode_clips(vae: TinyVAE, cfg: TrainConfig, batch: int = 8) -> LatentSet:
    data = ShapesDataset(cfg.seed, cfg.width, cfg.height)
    frames = 1 + 4 * (cfg.clip_latents - 1)
    out, prompts, objects, each = [], [], [], []
    t = np.arange(frames)
    for s in range(0, cfg.clips, batch):
        idx = list(range(s, min(s + batch, cfg.clips)))
        pixels = [data.frames(i, frames) for i in idx]
        video = torch.stack([torch.from_numpy(p) for p in pixels])
        video = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        out.append(vae.encode(video).half())
        for i, p in zip(idx, pixels, strict=True):
            clip = data.clip(i)
            prompts.append(clip.prompt)
            objects.append(latent_object_mask(p, BACKGROUNDS[clip.background]))
            masks = [latent_cells(shape_mask(o.shape, *trajectory(clip, j, t)[0].T, clip.radius, cfg.height,
                                             cfg.width)) for j, o in enumerate(clip.objects)]
            each.append(torch.stack([*masks, *[torch.zeros_like(masks[0])] * (2 - len(masks))]))
    return LatentSet(torch.cat(out), prompts, torch.stack(objects), torch.stack(each))


# -- DiT ----------------------------------------------------------------------------------------------


@dataclass
class TeacherForcingBatch:
    """One training batch: clean then noisy copies of the chosen blocks, per-frame t, RoPE
    positions, the target flow of the noisy half and its loss weight."""

    x: Tensor  # [B, C, 2n, h, w]
    t: Tensor  # [B, 2n]
    positions: Tensor  # [B, 2n]
    target: Tensor  # [B, C, n, h, w]
    weight: Tensor  # [B, 1, n, h, w]: 1, or 1 + object_loss_weight where an object is
    # [B, n] bool: clean frames that stay the data in `with_own_context` (a window's first block
    # when it does not follow the sink: it stands for the block a stream's cache always has there)
    given: Tensor
    prompts: list[str]
    fpb: int  # latent frames per block


def teacher_forcing_mask(blocks: int, fpb: int) -> Tensor:
    """Frame-level mask over [clean blocks, noisy blocks]: clean i sees clean j <= i; noisy i sees
    clean j < i and noisy i."""
    n = blocks * fpb
    allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(blocks):
        rows = slice(i * fpb, (i + 1) * fpb)
        allowed[rows, : (i + 1) * fpb] = True
        noisy = slice(n + i * fpb, n + (i + 1) * fpb)
        allowed[noisy, : i * fpb] = True
        allowed[noisy, noisy] = True
    return allowed


def teacher_forcing_attention(q: Tensor, k: Tensor, v: Tensor, blocks: int, fpb: int, tpf: int) -> Tensor:
    """Attention under `teacher_forcing_mask` for q, k, v [B, L, H, D] (L = 2 x blocks x fpb x tpf
    tokens), without computing the masked-out pairs and without a mask: clean block i and noisy
    block i both attend to the clean blocks before i plus one block of their own (clean i, noisy i),
    so they share a key length and run as one unmasked attention per block. Less than half the work
    of the masked full attention, which was most of a training step on CPU (6 blocks: 0.48 -> 0.27 s
    forward + backward per layer at batch 4, 1 thread; the masked CPU kernel computes every pair)."""
    n = q.shape[1] // 2
    per_block = fpb * tpf
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    clean_out, noisy_out = [], []
    for i in range(blocks):
        own = slice(i * per_block, (i + 1) * per_block)
        noisy = slice(n + i * per_block, n + (i + 1) * per_block)

        def keys(x: Tensor, own: slice = own, noisy: slice = noisy, i: int = i) -> Tensor:
            ctx = x[:, :, : i * per_block]
            return torch.cat([torch.cat([ctx, x[:, :, own]], 2), torch.cat([ctx, x[:, :, noisy]], 2)])

        out = F.scaled_dot_product_attention(torch.cat([q[:, :, own], q[:, :, noisy]]), keys(k), keys(v))
        clean_i, noisy_i = out.chunk(2)
        clean_out.append(clean_i)
        noisy_out.append(noisy_i)
    return torch.cat([*clean_out, *noisy_out], 2).transpose(1, 2)


def background_latent(latents: Tensor, objects: Tensor) -> Tensor:
    """The per-channel median [C, 1, 1, 1] of the latents [C, F, h, w] that `objects` leaves unmarked."""
    return latents.permute(1, 2, 3, 0)[~objects].median(0).values.view(-1, 1, 1, 1)


def smear_along(latents: Tensor, objects: Tensor, axis: int, reach: int) -> Tensor:
    """Latents [C, F, h, w] with each object stretched `reach` latents both ways along `axis`
    (-1: x, -2: y), at full strength: every latent takes the value, among its neighbours within
    `reach` on that axis, that stands out most from the background (the per-channel median of the
    latents `objects` [F, h, w] leaves unmarked), as the decoded streaks of long streams do."""
    bg = background_latent(latents, objects)
    d = latents - bg
    size = d.shape[axis]
    padded = F.pad(d, [reach, reach, 0, 0] if axis == -1 else [0, 0, reach, reach])
    shifts = torch.stack([padded.narrow(axis, i, size) for i in range(2 * reach + 1)])
    pick = shifts.norm(dim=1, keepdim=True).argmax(0, keepdim=True)  # [1, 1, F, h, w]
    return bg + shifts.gather(0, pick.expand(1, *d.shape))[0]


def stretch_mask(mask: Tensor, axis: int, reach: int) -> Tensor:
    """A bool mask [F, h, w] grown `reach` cells both ways along `axis` (-1: x, -2: y)."""
    size = (1, 2 * reach + 1) if axis == -1 else (2 * reach + 1, 1)
    return F.max_pool2d(mask[:, None].float(), size, 1, (size[0] // 2, size[1] // 2))[:, 0] > 0


def degrade_context(latents: Tensor, objects: Tensor, each: Tensor, prompt: str, cfg: TrainConfig,
                    gen: torch.Generator) -> Tensor:
    """Window context [C, F, h, w] as long streams corrupt it (`objects` [F, h, w] the latents any
    object touches, `each` [2, F, h, w] each object's): for a two-object clip, a `fade_share` of
    the time one object (drawn at random) faded toward the background by min_fade..1 of its
    contrast; else (a `dilate_share` of the time) dilated on both axes by 1..max_dilate each, every
    object bloated; else smeared along the first object's axis of motion by 1..max_smear latents,
    or with `smear_each` every object along its own (the later object wins where streaks meet)."""
    pair = bool(each[1].any())
    if pair and cfg.fade_share > 0 and torch.rand(1, generator=gen).item() < cfg.fade_share:
        j = int(torch.randint(2, (1,), generator=gen))
        fade = cfg.min_fade + (1 - cfg.min_fade) * torch.rand(1, generator=gen).item()
        return torch.where(each[j], latents - fade * (latents - background_latent(latents, objects)), latents)
    if cfg.dilate_share > 0 and torch.rand(1, generator=gen).item() < cfg.dilate_share:
        reach_x, reach_y = (int(r) for r in torch.randint(1, cfg.max_dilate + 1, (2,), generator=gen))
        return smear_along(smear_along(latents, objects, -1, reach_x), objects, -2, reach_y)
    shapes = parse_prompt(prompt, cfg.width, cfg.height).objects
    if not (pair and cfg.smear_each):
        axis = -1 if DIRECTIONS[shapes[0].direction][0] else -2  # latent w, or h
        reach = int(torch.randint(1, cfg.max_smear + 1, (1,), generator=gen))
        return smear_along(latents, objects, axis, reach)
    out = latents
    for obj, mask in zip(shapes, each, strict=True):
        axis = -1 if DIRECTIONS[obj.direction][0] else -2
        reach = int(torch.randint(1, cfg.max_smear + 1, (1,), generator=gen))
        out = torch.where(stretch_mask(mask, axis, reach), smear_along(latents, objects, axis, reach), out)
    return out


def pick_clip(data: LatentSet, cfg: TrainConfig, gen: torch.Generator) -> int:
    """A clip index: uniform, or a two-object clip `two_object_share` of the time."""
    pairs = data.two_object_clips if cfg.two_object_share > 0 else []
    if pairs and torch.rand(1, generator=gen).item() < cfg.two_object_share:
        return pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
    return int(torch.randint(len(data.prompts), (1,), generator=gen))


def sample_sigmas(n: int, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    sigma = cfg.shift * u / (1 + (cfg.shift - 1) * u)
    one = torch.rand(n, generator=gen) < cfg.one_step_share
    return torch.where(one, torch.ones_like(sigma), sigma).float()


def make_batch(data: LatentSet, cfg: TrainConfig, fpb: int, gen: torch.Generator) -> TeacherForcingBatch:
    total_blocks = data.latents.shape[2] // fpb
    xs, ts, ps, targets, weights, givens, prompts = [], [], [], [], [], [], []
    # Half the batches use the shortest window (cheap, and most of what the first blocks learn
    # from); the rest up to `window_blocks`, so the model sees as much context as the cache holds.
    window = 2 if torch.rand(1, generator=gen).item() < 0.5 else int(
        torch.randint(2, cfg.window_blocks + 1, (1,), generator=gen))
    window = min(window, cfg.window_blocks, total_blocks - 1)
    blocks = 1 + window
    for _ in range(cfg.batch):
        i = pick_clip(data, cfg, gen)
        s = int(torch.randint(1, total_blocks - window + 1, (1,), generator=gen))
        chosen = [0, *range(s, s + window)]
        frames = [b * fpb + f for b in chosen for f in range(fpb)]
        x0 = data.latents[i][:, frames].float()
        offset = 0
        if s > 1 and torch.rand(1, generator=gen).item() < 0.5:
            offset = int(torch.randint(cfg.max_position_offset, (1,), generator=gen))
        pos = torch.tensor([f if f < fpb else f + offset for f in frames])
        sigma = sample_sigmas(blocks, cfg, gen).repeat_interleave(fpb)
        noise = torch.randn(x0.shape, generator=gen)
        s_ = sigma.view(1, -1, 1, 1)
        noisy = (1 - s_) * x0 + s_ * noise
        ctx_sigma = cfg.context_noise * torch.rand(1, generator=gen).item()
        clean = x0 + ctx_sigma * torch.randn(x0.shape, generator=gen)
        if cfg.smear_share > 0 and torch.rand(1, generator=gen).item() < cfg.smear_share:
            window_frames = frames[fpb:]
            clean[:, fpb:] = degrade_context(clean[:, fpb:], data.objects[i][window_frames],
                                             data.each[i][:, window_frames], data.prompts[i], cfg, gen)
        xs.append(torch.cat([clean, noisy], 1))
        ts.append(torch.cat([torch.zeros(len(frames)), sigma * 1000]))
        ps.append(torch.cat([pos, pos]))
        targets.append(noise - x0)
        weight = 1 + cfg.object_loss_weight * data.objects[i][frames].float()[None]
        given = torch.zeros(len(frames), dtype=torch.bool)
        if s > 1:
            # The first window block then sees only the sink, frames earlier: where the object is
            # by now is unknowable (the RoPE offset hides the time), so its L2 optimum is the mean
            # of the positions, a streak along the axis of motion. At inference the block before
            # is always in the cache, so the block is context for the others and has no loss.
            # In own-context batches it stays the data for the same reason: predicted, it is that
            # streak, and every later block's context would grow from it (run 6's rollouts did).
            weight[:, fpb:2 * fpb] = 0
            given[fpb:2 * fpb] = True
        weights.append(weight)
        givens.append(given)
        prompts.append(data.prompts[i])
    return TeacherForcingBatch(torch.stack(xs), torch.stack(ts), torch.stack(ps), torch.stack(targets),
                               torch.stack(weights), torch.stack(givens), prompts, fpb)


def prompt_batch(model: CausalWanModel, context: Tensor) -> PromptBatch:
    """Cross-attention K/V of text rows [B, text_len, text_dim] with gradients (what
    `CausalWanModel.prompt_kv` computes per prompt without them)."""
    text = model.text_embedding(context)
    ks, vs = zip(*(model.blocks[str(i)].cross_attn.text_kv(text) for i in model.layers), strict=True)
    return PromptBatch(model.layers.start, torch.stack(ks), torch.stack(vs))


def dit_flow(model: CausalWanModel, text: WordTextEncoder, batch: TeacherForcingBatch) -> Tensor:
    """The model's flow prediction for the noisy half of a teacher-forcing batch."""
    _, _, f, h, w = batch.x.shape
    ph, pw = model.config.patch_size[1:]
    gh, gw = h // ph, w // pw
    cos, sin = model.rope.cos_sin(batch.positions, gh, gw)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return teacher_forcing_attention(q, k, v, f // (2 * batch.fpb), batch.fpb, gh * gw)

    prompts = prompt_batch(model, text.embed(batch.prompts))
    v = model(batch.x, batch.t, prompts, attend)
    return v[:, :, f // 2:]


def dit_loss(model: CausalWanModel, text: WordTextEncoder, batch: TeacherForcingBatch) -> Tensor:
    """Object-weighted MSE of the flow (normalised by the mean weight, so the scale stays the
    plain MSE's). Objects cover ~8 % of the latents: unweighted, the run-3 model drew the
    background well (x0 error 0.03) and the object badly (0.45), docs/quality.md."""
    err = (dit_flow(model, text, batch) - batch.target) ** 2
    return (batch.weight * err).mean() / batch.weight.mean()


@torch.no_grad()
def with_own_context(model: CausalWanModel, text: WordTextEncoder, batch: TeacherForcingBatch,
                     gen: torch.Generator, passes: int = 1) -> TeacherForcingBatch:
    """The batch with its clean context replaced by the model's own one-step predictions. Pass 1
    draws each block from pure noise given the true blocks before it; pass k does it again given
    pass k-1's blocks, so after k passes blocks 0..k-1 are exactly a k-block autoregressive
    rollout (the same noise per block) and later blocks sit on k-deep rollouts. Frames the batch
    marks `given` stay the data: a window's first block that does not follow the sink is the
    rollout's starting point, as the cache's previous block is at inference. At inference the
    cache holds the model's outputs, not the data; training on them teaches it to pull a drifting
    or blurred object back onto the prompted path instead of fading it out (exposure bias)."""
    f = batch.x.shape[2] // 2
    noise = torch.randn(batch.target.shape, generator=gen)
    t = torch.cat([batch.t[:, :f], torch.full_like(batch.t[:, f:], 1000.0)], 1)
    data = batch.x[:, :, :f]
    keep = batch.given[:, None, :, None, None]
    context = data
    for _ in range(min(passes, f // batch.fpb)):  # more passes than blocks change nothing
        probe = dataclasses.replace(batch, x=torch.cat([context, noise], 2), t=t)
        context = torch.where(keep, data, noise - dit_flow(model, text, probe))
    return dataclasses.replace(batch, x=torch.cat([context, batch.x[:, :, f:]], 2))


@dataclass
class DiTTraining:
    model: CausalWanModel
    text: WordTextEncoder
    ema_model: CausalWanModel
    ema_text: WordTextEncoder
    losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0


def new_dit(cfg: TrainConfig) -> tuple[CausalWanModel, WordTextEncoder]:
    mc = tiny_config()
    model = synthetic_model(mc, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return model, WordTextEncoder(VOCABULARY, mc.text_dim, mc.text_len)


def require_files(*files: Path) -> None:
    """A clear error for the first of `files` missing from the directory train-tiny should have written."""
    missing = next((f for f in files if not f.is_file()), None)
    if missing:
        raise ValueError(f"{missing.parent}: no {missing.name} there (not a directory train-tiny wrote)")


def load_trained_dit(root: str | Path) -> tuple[CausalWanModel, WordTextEncoder]:
    """The DiT and word text encoder of a model directory `write_trained_dir` wrote."""
    root = Path(root)
    weights, text_file = root / f"{BASE_DIT_PREFIX}.safetensors", root / WORD_TEXT_ENCODER_FILE
    require_files(weights, text_file)
    model = load_checkpoint(synthetic_model(tiny_config()), weights)
    return model, WordTextEncoder.load(text_file)


def finetune_config(cfg: TrainConfig) -> TrainConfig:
    """A Self-Forcing-style fine-tune of a trained model on its own rollouts: own context from the
    first step in most batches, rollouts as deep as the window, a lower learning rate."""
    return dataclasses.replace(cfg, lr=3e-4, warmup=25, own_context_after=0.0, own_context_share=0.75,
                               rollout_passes=cfg.window_blocks + 1)


def train_dit(data: LatentSet, cfg: TrainConfig, log: Log | None = None,
              init: tuple[CausalWanModel, WordTextEncoder] | None = None) -> DiTTraining:
    """Train the DiT + text encoder from scratch, or on from `init` (a fine-tune)."""
    model, text = init or new_dit(cfg)
    model.train().requires_grad_(True)
    text.train().requires_grad_(True)
    run = DiTTraining(model, text, copy.deepcopy(model).requires_grad_(False),
                      copy.deepcopy(text).requires_grad_(False))
    params = [*model.parameters(), *text.parameters()]
    ema_params = [*run.ema_model.parameters(), *run.ema_text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    fpb = model.config.frames_per_block
    budget = StepBudget(cfg.dit_steps, cfg.dit_seconds, calibrate=min(cfg.warmup, cfg.dit_steps))
    t0 = time.monotonic()
    avg = None
    step = 0
    while step < budget.total:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, budget.total, cfg.warmup)
        batch = make_batch(data, cfg, fpb, gen)
        own_context = step >= cfg.own_context_after * budget.total
        if own_context and torch.rand(1, generator=gen).item() < cfg.own_context_share:
            passes = int(torch.randint(1, cfg.rollout_passes + 1, (1,), generator=gen))
            batch = with_own_context(model, text, batch, gen, passes)
        loss = dit_loss(model, text, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        value = loss.item()
        avg = value if avg is None else 0.95 * avg + 0.05 * value
        step += 1
        budget.update(step)
        run.steps = step
        if step % 25 == 1 or step == budget.total:
            run.losses.append((step, round(avg, 5)))
            if log:
                log({"phase": "dit", "step": step, "of": budget.total, "loss": round(value, 5),
                     "loss_avg": round(avg, 5), "seconds": round(time.monotonic() - t0, 1)})
    model.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return run


# -- the model directory ------------------------------------------------------------------------------


def write_trained_dir(out: str | Path, model: CausalWanModel, vae: TinyVAE, text: WordTextEncoder,
                      record: dict[str, object]) -> Path:
    """A model directory the existing loaders read: the DiT (+ config.json), the tiny VAE, the
    word text encoder, and `train_tiny.json` (how it was made)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    write_checkpoint(model.state_dict(), root / f"{BASE_DIT_PREFIX}.safetensors", "safetensors",
                     config=model.config)
    write_tiny_vae_checkpoint(vae, root / TINY_VAE_FILES[0])
    text.save(root / WORD_TEXT_ENCODER_FILE)
    (root / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return root


def train_vae_dir(out: str | Path, cfg: TrainConfig, *, minutes: float | None = None, command: str = "",
                  log: Log | None = None) -> Path:
    """Phase 1 alone: train the VAE and write `taew2_1.safetensors` + `train_tiny.json` to `out`,
    a directory `train_tiny(vae_from=...)` reuses. The VAE's outcome varies with the seed far more
    than the DiT's (the same recipe scored 0.46 and 0.99 colour accuracy, docs/quality.md), so it is
    trained, checked and kept once, and every DiT run on top of it names it."""
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)  # the decoder-input noise draws from torch's global generator
    if minutes is not None:
        cfg = dataclasses.replace(cfg, vae_seconds=60.0 * minutes)
    vae, steps = train_vae(cfg, log)
    colour = vae_colour_accuracy(vae)
    if log:
        log({"phase": "vae_eval", **colour})
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_vae_checkpoint(vae, root / TINY_VAE_FILES[0])
    record = {"command": command, "seed": cfg.seed, "vae_steps_done": steps,
              "seconds": {"vae": round(time.monotonic() - t0, 1)},
              "reproduce": f"rollcast train-tiny --out VAE_DIR --seed {cfg.seed} --vae-only "
                           f"--vae-steps {steps}",
              "vae_reconstruction": colour, "torch": torch.__version__}
    (root / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return root


def load_trained_vae(root: str | Path) -> tuple[TinyVAE, dict[str, object]]:
    """The VAE of a directory `train_vae_dir` (or `train_tiny`) wrote, and its record."""
    root = Path(root)
    record_file, weights = root / RECORD_FILE, root / TINY_VAE_FILES[0]
    require_files(record_file, weights)
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{record_file}: not a train-tiny record ({e})") from None
    lacking = [k for k in ("reproduce", "vae_reconstruction") if k not in record]
    if lacking:
        raise ValueError(f"{record_file}: not a train-tiny record (no {', '.join(lacking)})")
    return TinyVAE.build(TinyVAEConfig.preset("small"), checkpoint=weights), record


def train_tiny(out: str | Path, cfg: TrainConfig, *, minutes: float | None = None, command: str = "",
               log: Log | None = None, vae_from: str | Path | None = None) -> Path:
    """The whole recipe: VAE, latent set, DiT + text encoder; writes the model directory. With
    `vae_from` (a directory `train_vae_dir` wrote) the VAE is that one instead of a new one. With
    `minutes`, a new VAE gets its steps or a quarter of the time if that is shorter, and the DiT
    what is left after encoding the clips (less a margin for writing); the step counts reached are
    recorded."""
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    if minutes is not None:
        cfg = dataclasses.replace(cfg, vae_seconds=15.0 * minutes, dit_steps=10**9)
    if vae_from is None:
        vae, vae_steps = train_vae(cfg, log)
        vae_colour = vae_colour_accuracy(vae)
        vae_record: dict[str, object] | None = None
    else:
        vae, vae_record = load_trained_vae(vae_from)
        vae_steps, vae_colour = vae_record["vae_steps_done"], vae_record["vae_reconstruction"]
    vae_s = time.monotonic() - t0
    if log:
        log({"phase": "vae_eval", **vae_colour})  # type: ignore[dict-item]
    t_enc = time.monotonic()
    data = encode_clips(vae, cfg)
    enc_s = time.monotonic() - t_enc
    if log:
        std = data.latents.float().std().item()
        log({"phase": "latents", "clips": len(data.prompts), "std": round(std, 4),
             "seconds": round(enc_s, 1)})
    if minutes is not None:
        left = 60.0 * minutes - (time.monotonic() - t0) - 20.0
        cfg = dataclasses.replace(cfg, dit_seconds=max(left, 1.0))
    run = train_dit(data, cfg, log)
    if vae_record is None:
        reproduce = (f"rollcast train-tiny --out DIR --seed {cfg.seed} --vae-steps {vae_steps} "
                     f"{dit_args(run.steps, cfg)}")
    else:
        reproduce = (f"{vae_record['reproduce']} && rollcast train-tiny --out DIR --seed {cfg.seed} "
                     f"--vae-from VAE_DIR {dit_args(run.steps, cfg)}")
    record = {
        "command": command, "seed": cfg.seed, "config": asdict(cfg),
        "vae_steps_done": vae_steps, "dit_steps_done": run.steps,
        "vae_from": None if vae_record is None else {"path": str(vae_from), "record": vae_record},
        "seconds": {"vae": round(vae_s, 1), "latents": round(enc_s, 1),
                    "total": round(time.monotonic() - t0, 1)},
        # The same weights from fixed step counts (same seed; fp sums may differ across thread counts).
        "reproduce": reproduce,
        "vae_reconstruction": vae_colour, "dit_loss_curve": run.losses, "torch": torch.__version__,
    }
    return write_trained_dir(out, run.ema_model, vae, run.ema_text, record)


def dit_args(steps: int, cfg: TrainConfig) -> str:
    """The DiT flags of a reproduce line: the steps run and the settings the CLI can set (zero
    shares and the default window are left out, so earlier runs' lines read as they did)."""
    shares = "".join(f" --{name.replace('_', '-')} {value}" for name, value in (
        ("smear_share", cfg.smear_share), ("dilate_share", cfg.dilate_share), ("fade_share", cfg.fade_share),
        ("two_object_share", cfg.two_object_share)) if value)
    shares += " --smear-each" if cfg.smear_each else ""
    window = (f" --window-blocks {cfg.window_blocks}"
              if cfg.window_blocks != TrainConfig.window_blocks else "")
    return f"--dit-steps {steps} --clips {cfg.clips} --batch {cfg.batch}{shares}{window}"


def finetune_tiny(out: str | Path, cfg: TrainConfig, base: str | Path, *, minutes: float | None = None,
                  command: str = "", log: Log | None = None) -> Path:
    """Fine-tune the DiT + text encoder of the model directory `base` on their own rollouts
    (`finetune_config`), with its VAE, on the clips of `cfg.seed`; writes a model directory whose
    record reproduces `base` and then this run."""
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    cfg = finetune_config(cfg)
    vae, base_record = load_trained_vae(base)
    init = load_trained_dit(base)
    data = encode_clips(vae, cfg)
    enc_s = time.monotonic() - t0
    if log:
        log({"phase": "latents", "clips": len(data.prompts), "seconds": round(enc_s, 1)})
    if minutes is not None:
        cfg = dataclasses.replace(cfg, dit_steps=10**9, dit_seconds=max(60.0 * minutes - enc_s - 20.0, 1.0))
    run = train_dit(data, cfg, log, init=init)
    # Each fine-tune in a chain writes TUNED_DIR_<k>, from the directory the step before wrote.
    k = base_record["reproduce"].count("--finetune-from") + 1
    source = "DIR" if k == 1 else f"TUNED_DIR_{k - 1}"
    reproduce = (f"{base_record['reproduce']} && rollcast train-tiny --out TUNED_DIR_{k} --seed {cfg.seed} "
                 f"--finetune-from {source} {dit_args(run.steps, cfg)}")
    record = {
        "command": command, "seed": cfg.seed, "config": asdict(cfg), "dit_steps_done": run.steps,
        "finetune_from": {"path": str(base), "record": base_record},
        "seconds": {"latents": round(enc_s, 1), "total": round(time.monotonic() - t0, 1)},
        "reproduce": reproduce, "vae_reconstruction": base_record["vae_reconstruction"],
        "dit_loss_curve": run.losses, "torch": torch.__version__,
    }
    return write_trained_dir(out, run.ema_model, vae, run.ema_text, record)
