"""`rollcast bench`: the engine's offline speed — one worker, B sessions in lockstep, no network.

What is measured (all times on the worker's clock; on GPU the host synchronises only at block ends,
everything inside a block is timed with CUDA events):

- A *block* is what every one of the B sessions needs for one block of F latent frames: (v2v) the
  VAE encode of its input, `steps` denoising forwards of the whole batch, the clean context
  forward when the cache policy has one, and the VAE decode of each session's latents to uint8
  frames. `block_ms` is its wall time; `fps` = B · 4F / mean block time (steady state: every
  block after the first decodes to 4F video frames).
- Warm-up blocks run first (default: enough to fill the KV cache's sink + window), so attention
  runs over a full cache and no start-up cost (allocator, kernels, thread pools) is measured.
- Components: `dit_step_ms` one denoising forward of the batch (`BlockRunner.run`: host
  bookkeeping, the model, the sampler); `dit_context_ms` the context forward; `vae_decode_ms` /
  `vae_encode_ms` one block of the whole batch (encode: inside the blocks for v2v, in a separate
  loop of the same shapes for t2v, where it is not part of the block); `text_encode_ms` one
  uncached prompt; `ttff_ms` a fresh session after warm-up: text encode of a new prompt + (v2v)
  its first input encode + the first block's forwards + its first decode, i.e. the time to the
  first decoded frame (its context pass runs after that frame exists).
- Stages: the layers split into S contiguous, even ranges; forward hooks time each range of every
  measured forward (stage 0 from the model's entry: patch and time embedding; the last stage to
  its exit: head and unpatchify), so per-forward stage times add up to the model's forward.
  `pipelined_fps_bound` is what S pipeline stages plus a separate codec stage could reach if
  every stage were always busy (no bubbles, no transfers): a block leaves the pipeline every
  max(slowest stage × forwards per block, codec time per block) and carries B · 4F frames.
- FLOPs are counted exactly (`flop_count.py`) for one steady-state forward, one block's decode
  and encode; `mfu.dit` = forward FLOPs / dit_step time / peak, `mfu.overall` = all FLOPs of a
  block (forwards + decode + encode for v2v) / block time / peak.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rollcast.loadgen.flop_count import Peak, count_flops, device_peak
from rollcast.pipeline_parallel.parallel_config import ParallelConfig
from rollcast.pipeline_parallel.partition import even_ranges
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.work import BatchShape, ForwardShape
from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.sampler import FlowMatchSampler
from rollcast.workers.stream_generator import WorkerSpec
from rollcast.workers.vae import VAE_KINDS, video_frames
from rollcast.workers.video_file import to_pixels
from rollcast.workers.video_pipeline import PipelineSpec, VideoPipeline, VideoSession, run_block

MODES = ("t2v", "v2v")
PROMPT = "a red fox running through fresh snow at dawn, cinematic"

Mark = float | torch.cuda.Event


@dataclass(frozen=True)
class BenchConfig:
    worker: WorkerSpec
    vae: str | None = None  # "wan" | "tiny"; default: the model config's
    mode: str = "t2v"
    steps: int | None = None  # default: all the sampler's trained steps
    batch: int = 1
    stages: int = 1
    # None: one device, stage times cut from one model's forward (the single-device baseline);
    # "local"/"mp": the layers really run on `stages` pipeline stages (threads / processes).
    executor: str | None = None
    iters: int = 5
    warmup: int | None = None  # blocks; default: enough to fill the KV cache
    peak_tflops: float | None = None
    seed: int = 0

    @property
    def v2v(self) -> bool:
        return self.mode == "v2v"

    @property
    def frames_per_block(self) -> int:
        return self.worker.frames_per_block or self.worker.config.frames_per_block

    def validate(self) -> None:
        """Every check that needs no model, so bad flags fail before anything loads."""
        layers = self.worker.config.num_layers
        for name, value in (("--batch", self.batch), ("--iters", self.iters)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 1 <= self.stages <= layers:
            raise ValueError(f"--stages must be between 1 and the model's {layers} layers "
                             f"({self.worker.config.name}), got {self.stages}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.vae is not None and self.vae not in VAE_KINDS:
            raise ValueError(f"--vae must be one of {list(VAE_KINDS)}, got {self.vae!r}")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise ValueError(f"--peak-tflops must be a positive number, got {self.peak_tflops}")
        self.worker.config.latent_hw(*self.worker.resolution)
        self.worker.policy.validate_block(self.frames_per_block)
        try:
            FlowMatchSampler(self.worker.sampler).timesteps(self.steps)
        except ValueError as e:
            raise ValueError(f"--steps: {e}") from None

    def pipeline_spec(self) -> PipelineSpec:
        # One cache row per benchmarked session plus one for the TTFF session.
        worker = dataclasses.replace(self.worker, max_sessions=self.batch + 1, seed=self.seed)
        return PipelineSpec(worker=worker, vae=self.vae)


# -- timing -------------------------------------------------------------------------------------


class DeviceClock:
    """Points on the device's timeline: CUDA events on GPU (recording never syncs the host),
    perf_counter on CPU (where the work is done when the call returns)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start: Mark, end: Mark) -> float:
        """Milliseconds between two marks; on GPU only after a `sync` past both."""
        if isinstance(start, torch.cuda.Event):
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0  # type: ignore[operator]


class StageTimer:
    """Marks each forward of `model` at its entry, at the first layer of every stage after the
    first, and at its exit, while `enabled`; `stage_ms` turns them into per-stage times."""

    def __init__(self, model: CausalWanModel, ranges: list[range], clock: DeviceClock) -> None:
        self.clock = clock
        self.enabled = False
        self.marks: list[list[Mark]] = []
        self._hooks = [model.register_forward_pre_hook(self._enter)]
        self._hooks += [model.blocks[str(r.start)].register_forward_pre_hook(self._boundary)
                        for r in ranges[1:]]
        self._hooks.append(model.register_forward_hook(self._exit))

    def _enter(self, *_: object) -> None:
        if self.enabled:
            self.marks.append([self.clock.mark()])

    def _boundary(self, *_: object) -> None:
        if self.enabled and self.marks:
            self.marks[-1].append(self.clock.mark())

    def _exit(self, *_: object) -> None:
        self._boundary()

    def stage_ms(self) -> list[list[float]]:
        """Per forward, per stage milliseconds (call after a sync)."""
        return [[self.clock.ms(a, b) for a, b in itertools.pairwise(m)] for m in self.marks]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class BlockTimes:
    wall_ms: float
    encode_ms: float  # v2v input of all sessions (0 for t2v)
    step_ms: list[float]  # one per denoising forward
    context_ms: float | None
    decode_ms: float


@dataclass
class _Rig:
    """What the measuring functions share."""

    config: BenchConfig
    pipeline: VideoPipeline
    clock: DeviceClock
    rng: np.random.Generator

    def input_frames(self, n: int) -> np.ndarray:
        """Random uint8 input frames [n, H, W, 3] at the pipeline's resolution."""
        w, h = self.pipeline.resolution
        return self.rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def timed_block(rig: _Rig, sessions: list[VideoSession]) -> BlockTimes:
    """Run one block of every session (they move in lockstep); sync once, at the end."""
    clock, runner = rig.clock, rig.pipeline.runner
    states = [s.state for s in sessions]
    inputs = ([rig.input_frames(s.block_frames(s.blocks_in)) for s in sessions]
              if rig.config.v2v else [])  # drawn before the clock starts
    start = time.perf_counter()
    marks = [clock.mark()]
    for s, frames in zip(sessions, inputs, strict=False):
        s.push_frames(frames)
    marks.append(clock.mark())
    outs: list[torch.Tensor | None] = [None]
    while outs[0] is None:
        outs = runner.run(states)
        marks.append(clock.mark())
    steps = len(marks) - 2
    if runner.policy.context_pass:
        runner.run(states)
        marks.append(clock.mark())
    if any(o is None for o in outs):
        raise RuntimeError("the benchmark's sessions fell out of lockstep")
    for s, x0 in zip(sessions, outs, strict=True):
        s.decode(x0)  # type: ignore[arg-type]
    marks.append(clock.mark())
    clock.sync()
    wall = (time.perf_counter() - start) * 1000.0
    ms = [clock.ms(a, b) for a, b in itertools.pairwise(marks)]
    return BlockTimes(wall, ms[0], ms[1:1 + steps], ms[1 + steps] if runner.policy.context_pass else None,
                      ms[-1])


def time_text_encode(rig: _Rig, repeats: int = 3) -> float:
    """Median ms of encoding one new prompt with the text encoder itself (no prompt cache)."""
    text = rig.pipeline.text
    text.encode([PROMPT])  # warm-up
    times = []
    for i in range(repeats):
        rig.clock.sync()
        t0 = time.perf_counter()
        text.encode([f"{PROMPT}, take {i}"])
        rig.clock.sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def time_encode(rig: _Rig) -> float:
    """Median ms of encoding one steady-state block of input (4F frames) for each of B fresh
    encode states, as a v2v block would (uint8 to pixels included)."""
    vae, cfg, clock = rig.pipeline.vae, rig.config, rig.clock
    device = rig.pipeline.runner.device
    states = [vae.encode_state() for _ in range(cfg.batch)]

    def encode(frames: np.ndarray) -> None:
        for st in states:
            vae.encode_chunk(to_pixels(frames, device)[None].to(vae.dtype), st)

    encode(rig.input_frames(video_frames(cfg.frames_per_block)))  # block 0, and warm-up
    chunk = rig.input_frames(4 * cfg.frames_per_block)
    times = []
    for _ in range(cfg.iters):
        clock.sync()
        t0 = time.perf_counter()
        encode(chunk)
        clock.sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def time_ttff(rig: _Rig) -> float:
    """Ms from opening a fresh session (new prompt) to its first decoded frames."""
    pipeline, cfg = rig.pipeline, rig.config
    first_input = rig.input_frames(video_frames(cfg.frames_per_block)) if cfg.v2v else None
    rig.clock.sync()
    t0 = time.perf_counter()
    session = pipeline.open("bench-ttff", f"{PROMPT}, seen for the first time ({cfg.seed})",
                            seed=cfg.seed + cfg.batch, num_steps=cfg.steps, v2v=cfg.v2v)
    try:
        if first_input is not None:
            session.push_frames(first_input)
        session.decode(run_block(pipeline.runner, session.state))
        rig.clock.sync()
        return (time.perf_counter() - t0) * 1000.0
    finally:
        pipeline.close(session)


# -- FLOPs -------------------------------------------------------------------------------------


def count_codec_flops(rig: _Rig) -> tuple[int, int]:
    """(decode, encode) FLOPs of one steady-state block of the whole batch: one session's second
    block (its first is the shorter start-up chunk) times B."""
    vae, cfg = rig.pipeline.vae, rig.config
    runner = rig.pipeline.runner
    f = cfg.frames_per_block
    lh, lw = runner.latent_hw
    z = torch.randn(1, vae.z_dim, f, lh, lw, device=runner.device).to(vae.dtype)
    dec = vae.decode_state()
    vae.decode_chunk(z, dec)
    decode = count_flops(lambda: vae.decode_chunk(z, dec))
    enc = vae.encode_state()
    device = runner.device
    vae.encode_chunk(to_pixels(rig.input_frames(video_frames(f)), device)[None].to(vae.dtype), enc)
    pixels = to_pixels(rig.input_frames(4 * f), device)[None].to(vae.dtype)
    encode = count_flops(lambda: vae.encode_chunk(pixels, enc))
    return decode * cfg.batch, encode * cfg.batch


def count_forward_flops(rig: _Rig, sessions: list[VideoSession]) -> int:
    """FLOPs of one steady-state denoising forward of the batch (it runs; the sessions are not
    used for timing afterwards)."""
    if rig.config.v2v:
        for s in sessions:
            s.push_frames(rig.input_frames(s.block_frames(s.blocks_in)))
    return count_flops(lambda: rig.pipeline.runner.run([s.state for s in sessions]))


def analytic_forward_flops(cfg: ModelConfig, shape: BatchShape) -> tuple[float, float]:
    """(the scheduler cost model's FLOPs of the forward, the FLOPs that formula leaves out).

    The cost model counts the per-token linears of the layers and the attention cores (self over
    the cache, cross over all text rows). It omits the patch embedding and head (2·dim·64 FLOPs
    per token each for a 1×2×2 patch of 16 channels) and the time embedding MLP (per latent frame,
    not per token): under 1 % of a Wan forward, a few % of the tiny model's.
    """
    cost = CostModel.for_model(cfg, name="analytic", peak_flops=1.0, half_tokens=0.0, overhead_s=0.0)
    patch = math.prod(cfg.patch_size)
    tokens = shape.size * shape.shape.tokens
    frames = shape.size * shape.shape.latent_frames
    per_token = 2 * cfg.dim * patch * (cfg.in_dim + cfg.out_dim)
    per_frame = 2 * cfg.dim * (cfg.freq_dim + cfg.dim + 6 * cfg.dim)
    return cost.flops(shape), float(tokens * per_token + frames * per_frame)


# -- memory ------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MB, kind): the CUDA allocator's peak since the reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_max_rss"  # bytes vs KiB


# -- the run -----------------------------------------------------------------------------------


def default_warmup(pipeline: VideoPipeline) -> int:
    """Blocks that fill every slot of the KV cache (sink + window), so that from the next block on
    attention is unmasked over a full cache — the steady state — and at least one block."""
    runner = pipeline.runner
    return max(1, math.ceil(runner.pool.capacity / runner.frames_per_block))


@dataclass
class _Measured:
    blocks: list[BlockTimes]
    stage_ms: list[list[float]]  # per measured forward (denoising and context), per stage
    text_ms: float
    encode_ms: float
    ttff_ms: float
    dit_flops: int
    decode_flops: int
    encode_flops: int
    warmup: int


def measure(rig: _Rig, ranges: list[range]) -> _Measured:
    cfg, pipeline = rig.config, rig.pipeline
    sessions = [pipeline.open(f"bench{i}", PROMPT, seed=cfg.seed + i, num_steps=cfg.steps, v2v=cfg.v2v)
                for i in range(cfg.batch)]
    try:
        warmup = default_warmup(pipeline) if cfg.warmup is None else cfg.warmup
        for _ in range(warmup):
            timed_block(rig, sessions)
        model = pipeline.runner.model
        if model is None:  # real stages: their own clocks time them
            log = pipeline.runner.dit.stage_log  # type: ignore[attr-defined]
            log.clear()
            blocks = [timed_block(rig, sessions) for _ in range(cfg.iters)]
            stage_ms = [[s * 1000.0 for s in fw] for fw in log]
            # The forward's FLOPs happen on the stages, out of this thread's counter's sight.
            geo = pipeline.runner.pool
            shape = BatchShape(cfg.batch, ForwardShape(pipeline.runner.frames_per_block, geo.tokens_per_frame,
                                                       geo.capacity, pipeline.resolution))
            dit_flops = int(sum(analytic_forward_flops(cfg.worker.config, shape)))
        else:
            timer = StageTimer(model, ranges, rig.clock)
            try:
                timer.enabled = True
                blocks = [timed_block(rig, sessions) for _ in range(cfg.iters)]
                timer.enabled = False
                stage_ms = timer.stage_ms()
            finally:
                timer.remove()
            dit_flops = count_forward_flops(rig, sessions)
    finally:
        for s in sessions:
            pipeline.close(s)
    encode_ms = (statistics.median(b.encode_ms for b in blocks) if cfg.v2v else time_encode(rig))
    decode_flops, encode_flops = count_codec_flops(rig)
    return _Measured(blocks, stage_ms, time_text_encode(rig), encode_ms, time_ttff(rig), dit_flops,
                     decode_flops, encode_flops, warmup)


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Build the pipeline (random weights without a checkpoint), measure, and return the report."""
    config.validate()
    parallel = ParallelConfig(stages=config.stages, executor=config.executor or "local",
                              rebalance=False) if config.executor else ParallelConfig()
    pipeline = VideoPipeline.build(config.pipeline_spec(), parallel.build_runner)
    device = pipeline.runner.device
    peak = device_peak(device, config.worker.dtype, config.peak_tflops)
    reset_peak_memory(device)
    rig = _Rig(config, pipeline, DeviceClock(device), np.random.default_rng(config.seed))
    ranges = getattr(pipeline.runner.dit, "ranges", None) or even_ranges(config.worker.config.num_layers,
                                                                         config.stages)
    with torch.no_grad():
        measured = measure(rig, ranges)
    memory_mb, memory_kind = peak_memory(device)
    pipeline.shutdown()
    return build_report(rig, ranges, measured, peak, memory_mb, memory_kind)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


@dataclass(frozen=True)
class _Geometry:
    shape: BatchShape  # one forward of the batch
    forwards: int  # per block: denoising steps + the context pass
    video_frames: int  # per block and session, steady state


def build_report(rig: _Rig, ranges: list[range], m: _Measured, peak: Peak, memory_mb: float,
                 memory_kind: str) -> dict[str, Any]:
    runner = rig.pipeline.runner
    f = runner.frames_per_block
    geo = _Geometry(
        BatchShape(rig.config.batch, ForwardShape(f, runner.pool.tokens_per_frame, runner.pool.capacity,
                                                  rig.pipeline.resolution)),
        len(m.blocks[0].step_ms) + (1 if runner.policy.context_pass else 0), 4 * f)
    times = _times(rig, ranges, m, geo)
    return {**_echo(rig, m, geo), **times, **_flops(rig, m, geo, times, peak),
            "peak_memory_mb": _r(memory_mb, 1), "memory_kind": memory_kind}


def _echo(rig: _Rig, m: _Measured, geo: _Geometry) -> dict[str, Any]:
    cfg, pipeline = rig.config, rig.pipeline
    runner, spec = pipeline.runner, pipeline.spec.worker
    return {
        "config": spec.config.name, "resolution": list(pipeline.resolution),
        "steps": len(m.blocks[0].step_ms), "batch": cfg.batch, "stages": cfg.stages,
        "executor": cfg.executor or "one device",
        "vae": pipeline.spec.vae_kind, "mode": cfg.mode, "policy": runner.policy.name,
        "device": str(runner.device), "device_name": _device_name(runner.device),
        "dtype": str(spec.dtype).removeprefix("torch."), "iters": cfg.iters, "warmup": m.warmup,
        "seed": cfg.seed, "frames_per_block": runner.frames_per_block,
        "video_frames_per_block": geo.video_frames, "forwards_per_block": geo.forwards,
        "tokens_per_forward": geo.shape.size * geo.shape.shape.tokens,
        "kv_tokens": geo.shape.shape.kv_tokens,
    }


def _times(rig: _Rig, ranges: list[range], m: _Measured, geo: _Geometry) -> dict[str, Any]:
    cfg, blocks = rig.config, m.blocks
    block_ms = [b.wall_ms for b in blocks]
    fps = cfg.batch * geo.video_frames / (statistics.mean(block_ms) / 1000)
    context = [b.context_ms for b in blocks if b.context_ms is not None]
    decode_ms = statistics.median(b.decode_ms for b in blocks)
    stage_ms = [statistics.median(fw[s] for fw in m.stage_ms) for s in range(len(ranges))]
    # The pipelined bound: each stage busy all the time, the codec on its own stage.
    period_ms = max(max(stage_ms) * geo.forwards, decode_ms + (m.encode_ms if cfg.v2v else 0.0))
    return {
        "fps": _r(fps, 3), "fps_per_stream": _r(fps / cfg.batch, 3),
        "block_ms": {"p50": _r(statistics.median(block_ms)), "mean": _r(statistics.mean(block_ms))},
        "block_breakdown_ms": {
            "encode": _r(statistics.mean(b.encode_ms for b in blocks)),
            "dit": _r(statistics.mean(sum(b.step_ms) for b in blocks)),
            "context": _r(statistics.mean(context) if context else 0.0),
            "decode": _r(statistics.mean(b.decode_ms for b in blocks)),
        },
        "ttff_ms": _r(m.ttff_ms), "text_encode_ms": _r(m.text_ms),
        "dit_step_ms": _r(statistics.median(t for b in blocks for t in b.step_ms)),
        "dit_context_ms": _r(statistics.median(context) if context else None),
        "vae_decode_ms": _r(decode_ms), "vae_encode_ms": _r(m.encode_ms),
        "stage_timings": [{"stage": i, "layers": [r.start, r.stop], "dit_ms": _r(t)}
                          for i, (r, t) in enumerate(zip(ranges, stage_ms, strict=True))],
        "pipelined_fps_bound": _r(cfg.batch * geo.video_frames / (period_ms / 1000), 3),
    }


def _flops(rig: _Rig, m: _Measured, geo: _Geometry, times: dict[str, Any], peak: Peak) -> dict[str, Any]:
    analytic, omitted = analytic_forward_flops(rig.pipeline.spec.worker.config, geo.shape)
    block_flops = geo.forwards * m.dit_flops + m.decode_flops + (m.encode_flops if rig.config.v2v else 0)
    dit_rate = m.dit_flops / (times["dit_step_ms"] / 1000)
    block_rate = block_flops / (times["block_ms"]["mean"] / 1000)
    peak_flops = peak.tflops * 1e12
    return {
        "flops": {"dit_forward": m.dit_flops, "vae_decode_block": m.decode_flops,
                  "vae_encode_block": m.encode_flops, "block": block_flops},
        "analytic_dit_forward_flops": analytic, "analytic_dit_omitted_flops": omitted,
        "tflops": {"dit": _r(dit_rate / 1e12, 6), "overall": _r(block_rate / 1e12, 6)},
        "mfu": {"dit": _r(dit_rate / peak_flops, 6), "overall": _r(block_rate / peak_flops, 6)},
        "peak_tflops": _r(peak.tflops, 3), "peak_source": peak.source,
    }


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the threads torch uses (they set its speed)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                         model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of the report."""
    r = report
    w, h = r["resolution"]
    ctx = " + context" if r["dit_context_ms"] is not None else ""
    context_ms = "none" if r["dit_context_ms"] is None else f"{r['dit_context_ms']:.2f} ms"
    steps = f"{r['steps']} step" + ("s" if r["steps"] != 1 else "")
    stages = ", ".join(f"[{s['layers'][0]},{s['layers'][1]}) {s['dit_ms']:.2f} ms"
                       for s in r["stage_timings"])
    return "\n".join([
        f"rollcast bench: {r['config']} {w}x{h} {r['mode']}, {steps}{ctx}, batch {r['batch']}, "
        f"vae {r['vae']}, {r['policy']}, {r['device_name']} ({r['device']}, {r['dtype']})",
        f"  {r['fps']:.2f} fps ({r['fps_per_stream']:.2f} per stream); "
        f"block p50 {r['block_ms']['p50']:.2f} ms, mean {r['block_ms']['mean']:.2f} ms; "
        f"ttff {r['ttff_ms']:.1f} ms",
        f"  dit step {r['dit_step_ms']:.2f} ms, context {context_ms}, "
        f"decode {r['vae_decode_ms']:.2f} ms, encode {r['vae_encode_ms']:.2f} ms, "
        f"text {r['text_encode_ms']:.2f} ms",
        f"  stages: {stages}; pipelined bound {r['pipelined_fps_bound']:.1f} fps",
        f"  {r['tflops']['dit']:.3f} TFLOP/s in the DiT, MFU {100 * r['mfu']['dit']:.1f} % DiT / "
        f"{100 * r['mfu']['overall']:.1f} % overall of {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']}); "
        f"peak memory {r['peak_memory_mb']:.0f} MB ({r['memory_kind']})",
    ])
