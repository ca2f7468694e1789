"""The local executor: the real model in the engine's process, one micro-batch at a time.

It maps the engine's work items onto the worker side: each session is a `VideoSession` of a shared
`VideoPipeline` (a KV cache row, VAE states, prompt K/V); a micro-batch is one `BlockRunner.run`
over the sessions' stream states, followed by the VAE decode of every block it finished. The
engine's bookkeeping (step, context pass) and the runner's state machine advance in lockstep;
a mismatch is a bug and fails that session only.

The profile at start-up measures forwards at a few batch sizes on throwaway sessions and fits
the engine's cost model to this machine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.session import BlockGeometry, SessionRecord, SessionRequest
from rollcast.scheduler.work import BatchResult, BatchShape, ForwardShape, MicroBatch
from rollcast.workers.stream_state import Work
from rollcast.workers.video_pipeline import VideoPipeline, VideoSession

_WORK = {"denoise": Work.DENOISE, "context": Work.CONTEXT, "recache": Work.RECACHE}


class LocalExecutor:
    def __init__(self, pipeline: VideoPipeline) -> None:
        self.pipeline = pipeline
        self.sessions: dict[str, VideoSession] = {}
        self._inflight: MicroBatch | None = None

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

    # -- Executor --------------------------------------------------------------------------------

    def open(self, record: SessionRecord) -> None:
        if record.lanes != 1:
            raise ValueError("the local executor runs one lane per session (no stream batching)")
        req = record.request
        self.sessions[record.session_id] = self.pipeline.open(
            record.session_id, req.prompt, seed=req.seed, num_steps=req.steps, v2v=req.mode == "v2v")

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.pipeline.close(session)

    def set_steps(self, session_id: str, steps: int) -> None:
        session = self.sessions[session_id]
        self.pipeline.runner.set_num_steps(session.state, steps)

    def set_prompt(self, session_id: str, prompt: str, transition_blocks: int = 0) -> None:
        self.sessions[session_id].set_prompt(prompt, transition_blocks=transition_blocks)

    def push_frames(self, session_id: str, frames: object) -> int:
        return self.sessions[session_id].push_frames(frames)  # type: ignore[arg-type]

    def submit(self, batch: MicroBatch) -> None:
        if self._inflight is not None:
            raise RuntimeError("one micro-batch at a time: collect the previous one first")
        self._inflight = batch

    def collect(self) -> BatchResult:
        batch, self._inflight = self._inflight, None
        if batch is None:
            raise RuntimeError("nothing submitted")
        start = time.monotonic()
        failed: dict[str, str] = {}
        frames: dict[str, object | None] = {}
        states, sessions = [], []
        for item in batch.items:
            session = self.sessions.get(item.session_id)
            if session is None:
                failed[item.session_id] = "session is not open on the executor"
                continue
            expected = _WORK[item.kind]
            if session.state.next_work is not expected:
                failed[item.session_id] = (f"engine expected {item.kind}, worker is at "
                                           f"{session.state.next_work.value}")
                continue
            if item.kind == "denoise" and session.state.step == 0:
                session.before_block()
            states.append(session.state)
            sessions.append(session)
        if states:
            try:
                outputs = self.pipeline.runner.run(states)
                for session, x0 in zip(sessions, outputs, strict=True):
                    if x0 is not None:
                        frames[session.state.session_id] = session.decode(x0)
            except (RuntimeError, ValueError) as e:  # the whole forward failed: all its sessions
                for session in sessions:
                    failed[session.state.session_id] = f"{type(e).__name__}: {e}"
        _sync(self.pipeline.runner.device)
        return BatchResult(batch, start, time.monotonic(), frames=frames, failed=failed)

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
