"""The local executor: the real model in the engine's process, one micro-batch at a time.

It maps the engine's work items onto the worker side: each session is a `VideoSession` of a shared
`VideoPipeline` (a KV cache row, VAE states, prompt K/V); a micro-batch is one `BlockRunner.run`
over the sessions' stream states, followed by the VAE decode of every block it finished. The
engine's bookkeeping (step, context pass) and the runner's state machine advance in lockstep;
a mismatch is a bug and fails that session only.

Stream batching (lanes > 1, StreamDiffusionV2's stream batch). A session with L lanes holds L
stream states, each with its own KV cache row and generator, each running a one-step schedule:
lane i always denoises at t_i of the session's L-step schedule, so its row keeps history at its
own noise level (no clean context pass). Lane 0 starts each block from noise (t2v) or from the
noised input (v2v); lane i's x0 of block b is queued as lane i+1's input for block b, re-noised
to σ(t_{i+1}) with lane i+1's generator (`BlockRunner.add_input`); the last lane's x0 is the
block's output and is decoded with the session's decode state (blocks finish in order). A block
carries the prompt lane 0 ran it with down the lanes, so a prompt change applies to all lanes
from the same block on. Policies with a context pass or re-cache do not fit and are refused.

Pipelining. `submit` does everything up to launching the forward and `collect` the rest, so with
a runner split into S pipeline stages (`rollcast.pipeline_parallel`) up to S micro-batches are in
flight, each stage working on a different one; results come back in submission order. A local
model computes in `collect`, as before.

Threads. `submit`/`collect` (the forwards) run on the engine's loop without the engine's lock, while
clients may open, close, push input, change prompts or steps under it. Input frames are only
buffered by the caller (`VideoSession.add_frames`) and encoded here when their block starts;
prompt changes are queued and applied here before the forward (step changes come from the engine
on its loop); a session closed while its forward runs is freed when the forward is done.

The profile at start-up measures forwards at a few batch sizes on throwaway sessions and fits
the engine's cost model to this machine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rollcast.pipeline_parallel.pipeline_dit import PipelineFailedError
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.executor import CapacityError
from rollcast.scheduler.session import BlockGeometry, SessionRecord, SessionRequest
from rollcast.scheduler.work import BatchResult, BatchShape, ForwardShape, MicroBatch, WorkItem
from rollcast.workers.block_runner import PendingRun
from rollcast.workers.kv_cache import CacheFullError
from rollcast.workers.prompt_kv import PromptHandle
from rollcast.workers.stream_state import BlockInput, StreamState, Work
from rollcast.workers.video_pipeline import VideoPipeline, VideoSession, WeightedPrompt

_WORK = {"denoise": Work.DENOISE, "context": Work.CONTEXT, "recache": Work.RECACHE}
_LANE_SEED_STRIDE = 0x9E3779B97F4A7C15


def lane_seed(seed: int, lane: int) -> int:
    """The generator seed of a stream-batched session's lane: lane 0 draws from the session's
    seed (its block noise, as a one-lane session's), lane i > 0 from one derived from it."""
    return seed if lane == 0 else (seed + lane * _LANE_SEED_STRIDE) % 2**64


@dataclass
class _Stream:
    """One engine session on the worker."""

    video: VideoSession  # lane 0's state, the VAE states, v2v input, prompt transitions
    lanes: list[StreamState]  # lanes[0] is video.state; one per denoising step when stream-batched
    timesteps: list[float]  # stream-batched: lane i runs timesteps[i]
    # Per lane > 0: the prompt each block queued for it ran with on lane 0, in block order.
    handed: list[deque[PromptHandle]] = field(default_factory=list)
    # Client changes not applied yet (set from any thread under the executor's lock).
    prompt_changes: list[tuple[str | WeightedPrompt, int]] = field(default_factory=list)


@dataclass
class _InFlight:
    """A submitted micro-batch: what runs, what already failed, and the launched forward."""

    batch: MicroBatch
    sessions: list[str]  # open when submitted (busy until collected)
    started: float
    plan: list[tuple[WorkItem, _Stream]]
    pending: PendingRun | None
    failed: dict[str, str]
    lost: str | None = None  # the pipeline was found gone when launching


class LocalExecutor:
    def __init__(self, pipeline: VideoPipeline) -> None:
        self.pipeline = pipeline
        self.streams: dict[str, _Stream] = {}
        self._inflight: deque[_InFlight] = deque()  # launched, oldest first
        self._lock = threading.Lock()  # streams, queued changes, sessions of the running forwards
        self._busy: dict[str, int] = {}  # session -> its micro-batches in flight
        self._closing: list[_Stream] = []

    @property
    def sessions(self) -> dict[str, VideoSession]:
        """The open sessions' `VideoSession`s (lane 0 of stream-batched ones)."""
        with self._lock:
            return {sid: st.video for sid, st in self.streams.items()}

    # -- geometry the engine needs ------------------------------------------------------------------

    def geometry(self, request: SessionRequest) -> BlockGeometry:
        runner = self.pipeline.runner
        if request.resolution is not None and tuple(request.resolution) != self.pipeline.resolution:
            w, h = self.pipeline.resolution
            rw, rh = request.resolution
            raise ValueError(f"this worker serves {w}x{h}; got {rw}x{rh}")
        pool = runner.pool
        shape = ForwardShape(runner.frames_per_block, pool.tokens_per_frame, pool.capacity,
                             self.pipeline.resolution)
        return BlockGeometry(shape, runner.policy.context_pass)

    # -- Executor: client calls ----------------------------------------------------------------------

    def open(self, record: SessionRecord) -> None:
        req, lanes, sid = record.request, record.lanes, record.session_id
        runner = self.pipeline.runner
        if lanes > 1:
            policy = runner.policy
            if policy.context_pass or policy.recache_on_prompt_switch:
                what = "a clean context pass" if policy.context_pass else "re-caching on prompt switches"
                raise ValueError(
                    f"stream batching ({lanes} lanes) does not fit cache policy {policy.name!r}: each "
                    f"lane's cache row keeps the noisy K/V of its own denoising step, and {what} would "
                    f"rewrite them; use a policy without it (streamdiffusionv2) or one lane per session")
            if lanes != req.steps:
                raise ValueError(f"a stream batch has one lane per denoising step: {lanes} lanes for "
                                 f"{req.steps} steps")
        elif lanes != 1:
            raise ValueError(f"a session needs at least one lane, got {lanes}")
        runner.sampler.timesteps(req.steps)  # ValueError for a step count the sampler does not have
        with self._lock:
            if sid in self.streams:
                raise ValueError(f"session {sid!r} is open on the executor already")
        if runner.pool.free_rows < lanes:
            raise CapacityError(f"{lanes} KV cache rows needed, {runner.pool.free_rows} free")
        try:
            video = self.pipeline.open(sid, req.prompt, seed=req.seed, num_steps=req.steps,
                                       v2v=req.mode == "v2v")
        except CacheFullError as e:
            raise CapacityError(str(e)) from e
        states = [video.state]
        timesteps = list(video.state.timesteps)
        try:
            if lanes > 1:
                video.state.timesteps = [timesteps[0]]
                for i in range(1, lanes):
                    # Later lanes take every block as input from the lane before them.
                    st = runner.open(f"{sid}/lane{i}", video.state.prompt, seed=lane_seed(req.seed, i),
                                     num_steps=req.steps, v2v=True)
                    st.timesteps = [timesteps[i]]
                    states.append(st)
                for st in states[:-1]:  # only the last lane's blocks are decoded
                    st.decode_output = False
        except BaseException as e:
            for st in states[1:]:
                runner.close(st)
            self.pipeline.close(video)
            if isinstance(e, CacheFullError):
                raise CapacityError(str(e)) from e
            raise
        stream = _Stream(video, states, timesteps, handed=[deque() for _ in states])
        with self._lock:
            self.streams[sid] = stream

    def close(self, session_id: str) -> None:
        with self._lock:
            stream = self.streams.pop(session_id, None)
            if stream is None:
                return
            if session_id in self._busy:  # its forward is running: free it when that is done
                self._closing.append(stream)
                return
        self._free(stream)

    def rebuild(self) -> list[str]:
        """The pipeline's stages are gone: forget what was in flight, start fresh stages and carry
        every stream over (`BlockRunner.resume`: same rows, prompts re-sent, caches re-filled from
        the clean latents kept). Returns the sessions that could not be carried over (dropped
        here; the engine ends them): stream-batched ones, whose lanes cached noisy K/V."""
        with self._lock:
            streams = dict(self.streams)
            for stream in self._closing:  # closed while the pipeline died: rows went with it
                stream.video.release()
            self._closing.clear()
            self._inflight.clear()
            # Busy until carried over: a client's close meanwhile is deferred, as during a forward.
            self._busy = dict.fromkeys(streams, 1)
        try:
            self.pipeline.rebuild_runner()
        except BaseException:
            with self._lock:
                self.streams.clear()
                self._busy.clear()
                self._closing.clear()
            for stream in streams.values():
                stream.video.release()
            raise
        runner, prompts, dropped = self.pipeline.runner, {}, []
        for sid, stream in streams.items():
            try:
                if len(stream.lanes) > 1:
                    raise ValueError("stream-batched lanes cache noisy K/V, which cannot be re-filled")
                runner.resume(stream.lanes[0], prompts)
            except (RuntimeError, ValueError):
                dropped.append(sid)
                with self._lock:
                    self.streams.pop(sid, None)
                    self._closing = [st for st in self._closing if st is not stream]
                stream.video.release()
        self._done_with(list(streams))  # frees the carried-over ones closed meanwhile
        return dropped

    def _free(self, stream: _Stream) -> None:
        for st in stream.lanes[1:]:
            self.pipeline.runner.close(st)
        self.pipeline.close(stream.video)  # lane 0's row, VAE states, input buffer

    def set_steps(self, session_id: str, steps: int) -> None:
        """From the next block to start on. The engine calls it on its loop between forwards, when
        its own record switches (right after the last step of the block before)."""
        stream = self._stream(session_id)
        if len(stream.lanes) > 1:
            raise ValueError("a stream-batched session keeps its step count (one lane per step)")
        self.pipeline.runner.set_num_steps(stream.lanes[0], steps)

    def set_prompt(self, session_id: str, prompt: str | WeightedPrompt, transition_blocks: int = 0) -> None:
        """From the session's next block on, on every lane; the text encoder runs on the loop."""
        if transition_blocks < 0:
            raise ValueError(f"transition_blocks must be >= 0, got {transition_blocks}")
        stream = self._stream(session_id)
        with self._lock:
            stream.prompt_changes.append((prompt, transition_blocks))

    def push_frames(self, session_id: str, frames: object) -> int:
        """Buffer v2v input frames uint8 [T, H, W, 3] (any thread; encoded when their block starts).
        Returns the frames buffered and not yet encoded."""
        return self._stream(session_id).video.add_frames(frames)  # type: ignore[arg-type]

    def ready(self, session_id: str) -> bool:
        with self._lock:
            stream = self.streams.get(session_id)
        return True if stream is None else stream.video.input_ready()  # unknown: collect reports it

    def _stream(self, session_id: str) -> _Stream:
        with self._lock:
            return self.streams[session_id]

    # -- Executor: the loop ------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Micro-batches in flight at once: the runner's pipeline stages (1 for a local model).
        While the pipeline wants new layer ranges it drains: no more than are in flight now, and
        the submit that finds the ring empty moves the layers first."""
        if self.pipeline.runner.dit.rebalance_plan() is not None:
            return len(self._inflight) or 1
        return self.pipeline.runner.depth

    def submit(self, batch: MicroBatch) -> None:
        """Client changes, checks and block starts for the batch's sessions, then launch its
        forward (a local model runs it in `collect`; a pipeline starts it on stage 0 now)."""
        if len(self._inflight) >= self.depth:
            raise RuntimeError(f"{self.depth} micro-batches in flight: collect one first")
        dit = self.pipeline.runner.dit
        ranges = dit.rebalance_plan()
        if ranges is not None and not self._inflight:
            dit.rebalance(ranges)
        failed: dict[str, str] = {}
        with self._lock:
            streams = {i.session_id: self.streams.get(i.session_id) for i in batch.items}
            for sid, st in streams.items():
                if st is not None:
                    self._busy[sid] = self._busy.get(sid, 0) + 1
        for sid, stream in streams.items():  # client changes first (the text encoder may run)
            if stream is not None:
                err = self._apply_changes(stream)
                if err:
                    failed[sid] = err
        start = time.monotonic()
        plan: list[tuple[WorkItem, _Stream]] = []
        for item in batch.items:
            stream = streams[item.session_id]
            if stream is None:
                failed[item.session_id] = "session is not open on the executor"
                continue
            err = self._check(stream, item)
            if err:
                failed.setdefault(item.session_id, err)
            plan.append((item, stream))
        plan = [(i, s) for i, s in plan if i.session_id not in failed]
        for item, stream in plan:
            try:
                self._prepare(stream, item)
            except (RuntimeError, ValueError) as e:
                failed[item.session_id] = f"{type(e).__name__}: {e}"
        plan = [(i, s) for i, s in plan if i.session_id not in failed]
        pending, lost = None, None
        if plan:
            try:
                pending = self.pipeline.runner.launch([s.lanes[i.lane] for i, s in plan])
            except PipelineFailedError as e:
                lost = str(e)
            except (RuntimeError, ValueError) as e:  # the whole forward failed: all its sessions
                for item, _ in plan:
                    failed[item.session_id] = f"{type(e).__name__}: {e}"
                plan = []
        self._inflight.append(_InFlight(batch, list(streams), start, plan, pending, failed, lost))

    def collect(self) -> BatchResult:
        if not self._inflight:
            raise RuntimeError("nothing submitted")
        f = self._inflight.popleft()
        failed, frames = f.failed, {}
        stages: dict[str, float] = {}
        try:
            if f.lost is not None:
                return BatchResult(f.batch, f.started, time.monotonic(), lost=f.lost)
            if f.pending is not None:
                try:
                    outputs = self.pipeline.runner.complete(f.pending)
                except PipelineFailedError as e:  # a stage is gone: so is every session on it
                    return BatchResult(f.batch, f.started, time.monotonic(), lost=str(e))
                except (RuntimeError, ValueError) as e:  # the whole forward failed: all its sessions
                    outputs = []
                    for item, _ in f.plan:
                        failed[item.session_id] = f"{type(e).__name__}: {e}"
                handle = f.pending.handle
                stages = {f"stage{i}": s for i, s in enumerate(getattr(handle, "stage_s", None) or [])}
                if getattr(handle, "decode_s", 0.0):  # decoded where the pipeline ends
                    stages["decode"] = handle.decode_s  # type: ignore[attr-defined]
                for (item, stream), x0 in zip(f.plan, outputs, strict=False):
                    try:
                        self._finish(stream, item, x0, frames)
                    except (RuntimeError, ValueError) as e:
                        failed[item.session_id] = f"{type(e).__name__}: {e}"
            _sync(self.pipeline.runner.device)
            return BatchResult(f.batch, f.started, time.monotonic(), frames=frames, failed=failed,
                               stages=stages)
        finally:
            self._done_with(f.sessions)

    def _done_with(self, sessions: list[str]) -> None:
        """The batch's sessions are out of one forward; free those closed meanwhile and idle now."""
        with self._lock:
            for sid in sessions:
                n = self._busy.get(sid, 0) - 1
                if n > 0:
                    self._busy[sid] = n
                else:
                    self._busy.pop(sid, None)
            closing = [st for st in self._closing if st.video.state.session_id not in self._busy]
            self._closing = [st for st in self._closing if st not in closing]
        for stream in closing:
            self._free(stream)

    def _apply_changes(self, stream: _Stream) -> str | None:
        """Queued prompt changes, on the loop before the forward. Returns an error, if any."""
        with self._lock:
            prompts, stream.prompt_changes = stream.prompt_changes, []
        for prompt, transition in prompts:
            try:
                stream.video.set_prompt(prompt, transition_blocks=transition)
            except (RuntimeError, ValueError, TypeError) as e:
                return f"prompt change failed: {type(e).__name__}: {e}"
        return None

    def _check(self, stream: _Stream, item: WorkItem) -> str | None:
        """Why the worker cannot run `item` (the engine and the worker disagree), or None."""
        lanes = stream.lanes
        if len(lanes) == 1:
            state = lanes[0]
            if item.lane != 0:
                return f"engine sent lane {item.lane}; the session has one lane"
            expected = _WORK[item.kind]
            if state.next_work is not expected:
                return f"engine expected {item.kind}, worker is at {state.next_work.value}"
            if expected is Work.DENOISE and state.step != item.step:
                return f"engine expected step {item.step}, worker is at step {state.step}"
            if expected is Work.DENOISE and state.step == 0 and not stream.video.input_ready():
                return f"no input for block {item.block} (v2v frames have not arrived)"
            return None
        if item.kind != "denoise" or not 0 <= item.lane < len(lanes):
            return (f"engine sent {item.kind} on lane {item.lane}; the session has {len(lanes)} "
                    f"denoising lanes")
        state = lanes[item.lane]
        at = state.frames_done // self.pipeline.runner.frames_per_block
        if at != item.block:
            return f"lane {item.lane}: engine sent block {item.block}, the lane is at block {at}"
        if item.lane == 0 and not stream.video.input_ready():
            return f"no input for block {item.block} (v2v frames have not arrived)"
        if item.lane > 0 and not state.inputs:
            return (f"lane {item.lane} has no input for block {item.block} "
                    f"(lane {item.lane - 1} has not run it)")
        return None

    def _prepare(self, stream: _Stream, item: WorkItem) -> None:
        """Before the forward: a block starting on lane 0 gets its input encoded and the prompt
        transition's next step; a later lane takes the prompt its block ran with on lane 0."""
        state = stream.lanes[item.lane]
        if item.lane == 0:
            if item.kind == "denoise" and state.step == 0:
                if state.v2v and not state.inputs:
                    stream.video.encode_input(max_blocks=1)
                stream.video.before_block()
        else:
            prompt = stream.handed[item.lane].popleft()
            if prompt is not state.prompt:
                state.pending_prompt = prompt  # takes effect as the block starts

    def _finish(self, stream: _Stream, item: WorkItem, x0: Tensor | None,
                frames: dict[str, object | None]) -> None:
        runner = self.pipeline.runner
        lanes = stream.lanes
        if len(lanes) == 1:
            if x0 is not None:
                frames[item.session_id] = stream.video.decode(x0)
            return
        if x0 is None:
            raise RuntimeError(f"lane {item.lane} ran a one-step block without finishing it")
        nxt = item.lane + 1
        if nxt < len(lanes):
            t = stream.timesteps[nxt]
            runner.add_input(lanes[nxt], BlockInput(x0, runner.sampler.sigma(t), t))
            stream.handed[nxt].append(lanes[item.lane].prompt)
        else:
            frames[item.session_id] = stream.video.decode(x0, lanes[item.lane])

    # -- start-up profile -------------------------------------------------------------------------------

    def profile(self, cost: CostModel, *, batch_sizes: Sequence[int] = (1, 2, 4),
                repeats: int = 2) -> CostModel:
        """Time forwards at `batch_sizes` (and one decode) on throwaway sessions; return `cost` fitted
        to them. Needs as many free cache rows as the largest batch."""
        runner = self.pipeline.runner
        sizes = [b for b in batch_sizes if b <= runner.pool.free_rows]
        geo = self.geometry(SessionRequest("profile"))
        samples: list[tuple[BatchShape, float]] = []
        decodes: list[tuple[int, float]] = []
        for b in sizes:
            opened = [self.pipeline.open(f"__profile{i}", "", seed=i, num_steps=1) for i in range(b)]
            try:
                for r in range(repeats + 1):
                    t0 = time.perf_counter()
                    outs = runner.run([s.state for s in opened])
                    _sync(runner.device)
                    dt = time.perf_counter() - t0
                    if r > 0:  # the first run warms up
                        samples.append((BatchShape(b, geo.shape), dt))
                    x0 = next((o for o in outs if o is not None), None)
                    if x0 is not None and b == sizes[0]:
                        t0 = time.perf_counter()
                        opened[0].decode(x0)
                        _sync(runner.device)
                        decodes.append((geo.shape.latent_frames, time.perf_counter() - t0))
                    if runner.policy.context_pass:
                        runner.run([s.state for s in opened])
            finally:
                for s in opened:
                    self.pipeline.close(s)
        fitted = cost
        if len({b.size for b, _ in samples}) > 1:
            try:
                fitted = cost.fit(samples)
            except ValueError:
                # Times too noisy or flat to separate overhead from compute (tiny models on CPU):
                # keep the model's shape and learn only its overall scale.
                fitted = CostModel.from_dict(cost.to_dict())
                for shape, seconds in samples:
                    fitted.observe(shape, seconds, alpha=0.5)
        return fitted.fit_codec(decode_samples=decodes[1:] or decodes) if decodes else fitted


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
