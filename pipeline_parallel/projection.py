"""Projected StreamDiffusionV2-style FPS versus GPU count, from the H100 cost-model presets.

The scheme modelled (reference/streamdiffusionv2.md 3e): one stream batch of `steps` elements, one
latent frame (4 video frames) each, goes through the DiT per forward; the layers are split over N
GPUs in a ring with N stream batches in flight, so once the ring is full every micro-step emits
one finished latent frame, i.e. 4 video frames. A micro-step lasts as long as the slowest stage.

Assumptions, all of them simplifications:
- Forward time is the preset's `forward_s` of a `steps`-row batch of 1-frame items attending over
  6 KV frames, and it divides evenly over the layers (embed, head, launch overhead included:
  they are small and also per layer or per stage). A stage's compute is its layer share of that.
- The VAE runs on the edge stages, serially with their DiT share: the Wan VAE encode (the
  preset's) on stage 0, the decode on the last stage, one latent frame each per micro-step. This
  is what caps SDV2 at 3-4 GPUs: the decode alone is 86 ms at 480p (60 ms at 512²).
- Every stage pays one hop per micro-step when N > 1: a fixed latency (~20 µs NCCL p2p on
  NVLink, performance.md 3) plus its activations [steps, tokens, dim] in bf16 over ~370 GB/s.
  No overlap of communication with compute is assumed, which makes this slightly pessimistic.
- "even" is SDV2's default split; "balanced" is `plan_partition`, the exact optimum, which is
  what SDV2's one-shot `--schedule_block` rebalance approximates. Each GPU holds 80 GiB (H100) for
  its layers' bf16 weights and `steps` K/V copies (SDV2 keeps one cache per stream-batch row).
- Latency is steps × N micro-steps (a chunk circles the ring once per step, lock-stepped).

The presets are solved from the 1-GPU rows of the same figures (scheduler/cost_model.py), so the
1-GPU 1- and 4-step rows reproduce the paper by construction; every multi-GPU number is a
prediction. Against all 48 published multi-GPU figures (2-4 GPUs, 1-4 steps) the balanced
projection is 0.97-1.12× the paper; the worst is 14B 480p on 4 GPUs at 1 step, where the model
says the last stage's decode bounds the ring at 44 FPS and the paper reaches 39. The even split
comes out 0.70-0.95×, so the published multi-GPU runs were balanced, not split evenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rollcast.pipeline_parallel.layer_profile import layer_bytes
from rollcast.pipeline_parallel.partition import (
    DeviceSpec,
    LayerCost,
    PartitionPlan,
    evaluate_ranges,
    even_ranges,
    plan_partition,
)
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.work import BatchShape, ForwardShape
from rollcast.workers.model_config import ModelConfig

Split = Literal["even", "balanced"]

VIDEO_FRAMES_PER_LATENT = 4
KV_FRAMES = 6  # SDV2 num_kv_cache (latent frames, the block included)
H100_MEMORY_BYTES = 80 * 2**30
# (pixel size, tokens per latent frame) of the resolutions the presets exist for.
RESOLUTIONS: dict[str, tuple[tuple[int, int], int]] = {"480p": ((832, 480), 1560), "512": ((512, 512), 1024)}
MODELS = ("1.3b", "14b")

# StreamDiffusionV2 (arXiv 2511.07399) end-to-end FPS on H100 with NVLink, as copied into
# reference/performance.md 1.1: Figure 9 (1.3B) and Figure 11 (14B). Keys: (model, resolution,
# GPUs, steps). The 1.3B 3- vs 4-GPU series order was reconstructed from the PDF text (±1 series).
_FIG = {
    ("1.3b", "480p"): ((20.47, 17.97, 15.68, 13.95), (39.77, 34.67, 30.69, 27.06),
                       (43.88, 43.79, 41.13, 38.09), (44.38, 43.41, 43.08, 42.26)),
    ("1.3b", "512"): ((26.21, 24.02, 21.51, 19.43), (51.76, 46.92, 41.09, 37.49),
                      (63.45, 62.76, 56.75, 54.09), (64.52, 63.99, 62.43, 61.57)),
    ("14b", "480p"): ((12.68, 8.64, 6.49, 5.28), (25.39, 17.31, 13.23, 10.69),
                      (37.55, 25.02, 19.12, 15.42), (39.24, 33.36, 25.02, 20.05)),
    ("14b", "512"): ((18.71, 13.01, 10.09, 8.26), (37.12, 25.72, 20.11, 16.65),
                     (53.84, 37.47, 29.34, 24.35), (58.28, 51.09, 38.41, 31.62)),
}
PUBLISHED_FPS: dict[tuple[str, str, int, int], float] = {
    (model, res, gpus, steps): fps
    for (model, res), by_gpus in _FIG.items()
    for gpus, by_steps in enumerate(by_gpus, start=1)
    for steps, fps in enumerate(by_steps, start=1)
}


def stage_costs(
    model: str, steps: int, gpus: int, resolution: str = "480p", *,
    link_latency_s: float = 20e-6, link_bytes_per_s: float = 370e9,
    memory_bytes: int | None = H100_MEMORY_BYTES,
) -> tuple[list[LayerCost], list[DeviceSpec], float]:
    """Per-layer costs, per-GPU specs and the whole forward's seconds for one configuration."""
    if model not in MODELS or resolution not in RESOLUTIONS:
        raise ValueError(f"no H100 preset for model {model!r} at {resolution!r}; models {list(MODELS)}, "
                         f"resolutions {sorted(RESOLUTIONS)}")
    if steps < 1 or gpus < 1:
        raise ValueError(f"steps and gpus must be >= 1, got {steps} and {gpus}")
    cost = CostModel.preset(f"h100-wan-{model}-{resolution}")
    cfg = ModelConfig.preset(f"wan-{model}")
    size, tokens = RESOLUTIONS[resolution]
    forward_s = cost.forward_s(BatchShape(steps, ForwardShape(1, tokens, KV_FRAMES, size)))
    per_layer = LayerCost(forward_s / cfg.num_layers,
                          layer_bytes(cfg, kv_tokens=KV_FRAMES * tokens, batch=steps, dtype_bytes=2))
    hop_s = link_latency_s + steps * tokens * cfg.dim * 2 / link_bytes_per_s if gpus > 1 else 0.0
    encode_s, decode_s = cost.encode_s_per_latent_frame, cost.decode_s_per_latent_frame
    devices = [
        DeviceSpec(f"gpu{i}", memory_bytes=memory_bytes,
                   fixed_s=hop_s + (encode_s if i == 0 else 0.0) + (decode_s if i == gpus - 1 else 0.0))
        for i in range(gpus)
    ]
    return [per_layer] * cfg.num_layers, devices, forward_s


def project_fps(
    model: str, steps: int, gpus: int, resolution: str = "480p", *, split: Split = "balanced",
    link_latency_s: float = 20e-6, link_bytes_per_s: float = 370e9,
    memory_bytes: int | None = H100_MEMORY_BYTES,
) -> dict[str, Any]:
    """Projected steady-state FPS of one SDV2 stream on `gpus` H100s (see module docstring)."""
    layers, devices, forward_s = stage_costs(
        model, steps, gpus, resolution, link_latency_s=link_latency_s,
        link_bytes_per_s=link_bytes_per_s, memory_bytes=memory_bytes)
    plan: PartitionPlan
    if split == "balanced":
        plan = plan_partition(layers, devices)
    elif split == "even":
        plan = evaluate_ranges(even_ranges(len(layers), gpus), layers, devices)
    else:
        raise ValueError(f"split must be 'even' or 'balanced', got {split!r}")
    micro_s = plan.bottleneck_s
    published = PUBLISHED_FPS.get((model, resolution, gpus, steps))
    fps = VIDEO_FRAMES_PER_LATENT / micro_s
    return {
        "model": model, "resolution": resolution, "steps": steps, "gpus": gpus, "split": split,
        "forward_s": forward_s, "micro_step_s": micro_s, "fps": fps,
        "latency_s": steps * gpus * micro_s, "layers_per_stage": [len(r) for r in plan.ranges],
        "published_fps": published, "ratio": fps / published if published else None,
    }


def projection_table(
    models: Sequence[str] = MODELS, resolutions: Sequence[str] = ("480p", "512"),
    gpus: Sequence[int] = (1, 2, 3, 4), steps: Sequence[int] = (1, 4), **kwargs: Any,
) -> list[dict[str, Any]]:
    """One row per (model, resolution, steps, GPUs): balanced and even FPS beside the paper's."""
    rows = []
    for model in models:
        for res in resolutions:
            for k in steps:
                for n in gpus:
                    row = project_fps(model, k, n, res, split="balanced", **kwargs)
                    row["fps_even"] = project_fps(model, k, n, res, split="even", **kwargs)["fps"]
                    rows.append(row)
    return rows


def format_projection(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'model':<6} {'res':<5} {'steps':>5} {'gpus':>4} {'fps':>7} {'even':>7} {'paper':>7} "
             f"{'ratio':>6} {'step ms':>8} {'latency ms':>10}  layers"]
    for r in rows:
        paper = f"{r['published_fps']:>7.2f}" if r["published_fps"] else f"{'-':>7}"
        ratio = f"{r['ratio']:>6.2f}" if r["ratio"] else f"{'-':>6}"
        lines.append(f"{r['model']:<6} {r['resolution']:<5} {r['steps']:>5} {r['gpus']:>4} {r['fps']:>7.2f} "
                     f"{r['fps_even']:>7.2f} {paper} {ratio} {r['micro_step_s'] * 1e3:>8.1f} "
                     f"{r['latency_s'] * 1e3:>10.1f}  {','.join(map(str, r['layers_per_stage']))}")
    return "\n".join(lines)
