"""The driver's side of a pipeline: a `DiTForward` whose layers run on stage workers.

The driver (rank 0, in the engine's process) keeps everything per session that is not a layer's:
latents, noise generators, sampler steps, cache positions, VAE states (`BlockRunner`,
`VideoPipeline`). A forward is one ring message: the driver sends the latents, timesteps, σ and the
forward's `KVWrite` to stage 0, the activations travel stage to stage, and the last stage's x0
(and the frames of finished blocks, decoded there or on a decode stage) comes back to the driver,
which re-noises it and sends the next denoising step into stage 0. Up to `depth` (= the ranks
after the driver) forwards are in flight, so every stage works on a different micro-batch;
replies come back in launch order.

Rows and prompts: the driver allocates cache rows from a pool without layers (bookkeeping only)
and tells the stages; a prompt becomes a `PromptRef` whose embedding goes to every stage once,
and the stages drop its K/V after the last reference to it is gone.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rollcast.pipeline_parallel.decode_stage import split_frames
from rollcast.pipeline_parallel.partition import check_split
from rollcast.pipeline_parallel.ring_messages import RING_TAG, decode_text, ranges_tensor
from rollcast.pipeline_parallel.stage_balance import StageBalance
from rollcast.pipeline_parallel.transport import PeerFailedError, Transport
from rollcast.workers.dit_forward import ForwardOutput, KVWrite
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.model_config import ModelConfig
from rollcast.workers.prompt_kv import PromptHandle, PromptRef


class StageError(RuntimeError):
    """A stage raised while running a forward (that forward's sessions fail; the pipeline lives)."""


class PipelineFailedError(RuntimeError):
    """A stage is gone: every forward in flight and every later one fails with this."""


class StagedForward:
    """A launched forward; `wait` receives replies in order until this one's is in."""

    def __init__(self, dit: PipelineDiT) -> None:
        self.dit = dit
        self.output: ForwardOutput | None = None
        self.error: Exception | None = None
        self.stage_s: list[float] = []
        self.decode_s = 0.0

    @property
    def done(self) -> bool:
        return self.output is not None or self.error is not None

    def wait(self) -> ForwardOutput:
        while not self.done:
            self.dit.receive_one()
        if self.error is not None:
            raise self.error
        return self.output  # type: ignore[return-value]


class PipelineDiT:
    def __init__(self, transport: Transport, config: ModelConfig, pool: KVCachePool, ranges: list[range],
                 *, decodes: bool = False, decode_stage: bool = False, reply_timeout_s: float | None = None,
                 on_close: Callable[[], None] | None = None, auto_rebalance: bool = True) -> None:
        if len(pool.layers):
            raise ValueError("the driver's pool is bookkeeping only: it must hold no layers")
        self.transport = transport
        self.config = config
        self.pool = pool
        self.ranges = list(ranges)
        self.stages = len(ranges)
        self.decodes = decodes  # the last stage or the decode stage decodes finished blocks
        self.remote = True  # the layers live in other threads/processes, which can be lost
        self.depth = self.stages + decode_stage  # ranks after the driver: forwards in flight
        self.reply_timeout_s = reply_timeout_s
        self._on_close = on_close
        self._expected: deque[tuple[str, StagedForward | None]] = deque()
        self._ids = itertools.count()
        self._dropped: list[int] = []  # prompt ids whose refs are gone (appended from GC)
        self._failure: PipelineFailedError | None = None
        self._lock = threading.Lock()  # sends may come from client threads (open/close rows)
        self.closed = False
        # The last stage's decode time is its fixed cost, not its layers' (a decode stage's is neither).
        self._decode_on_last = decodes and not decode_stage
        self.balance = StageBalance(list(ranges)) if auto_rebalance else None
        # What the stages hold for K/V, all layers together (the driver's pool holds none).
        self.kv_bytes = pool.nbytes_per_layer * config.num_layers
        self._proposed: list[range] | None = None  # new ranges the pipeline should move to
        self.rebalances = 0
        self.stage_pids: list[int | None] = []  # stage processes (mp, ray), for operators and tests
        self.stage_actors: list[object] = []  # Ray actor handles (ray)
        self.stage_nodes: list[str] = []  # Ray node ids the stages run on (ray)
        self.stage_log: deque[list[float]] = deque(maxlen=4096)  # recent forwards' stage seconds

    @property
    def in_flight(self) -> int:
        return sum(1 for kind, _ in self._expected if kind == "forward")

    # -- DiTForward -------------------------------------------------------------------------

    def prompt_kv(self, embedding: Tensor) -> PromptHandle:
        ref = PromptRef(next(self._ids), embedding.detach())
        self._send("prompt", {"id": torch.tensor(ref.prompt_id), "embedding": embedding.detach()})
        weakref.finalize(ref, self._dropped.append, ref.prompt_id)
        return ref

    def opened(self, row: int) -> None:
        self._send("open_row", {"row": torch.tensor(row)})

    def released(self, row: int) -> None:
        if self._failure is None:  # a lost pipeline's rows went with it
            self._send("release_row", {"row": torch.tensor(row)})

    def launch(self, x: Tensor, t: Tensor, prompts: Sequence[PromptHandle], write: KVWrite,
               sigma: Tensor, decode_rows: Sequence[int]) -> StagedForward:
        if self.in_flight >= self.depth:
            raise RuntimeError(f"{self.depth} forwards in flight already: wait for one first")
        ids = [p.prompt_id for p in prompts if isinstance(p, PromptRef)]
        if len(ids) != len(prompts):
            raise TypeError("a staged forward takes prompts made by this pipeline (PromptRef)")
        f = len(write.frames[0])
        msg = {
            "x": x, "t": t, "sigma": sigma,
            "decode": torch.tensor(list(decode_rows), dtype=torch.long),
            "rows": torch.tensor(write.rows, dtype=torch.long),
            "frames": torch.tensor(write.frames, dtype=torch.long),
            "rope": torch.tensor(write.rope_positions, dtype=torch.long),
            "new_block": torch.tensor(write.new_block, dtype=torch.bool),
            "prompt_ids": torch.tensor(ids, dtype=torch.long),
            "grid": torch.tensor([f, *write.grid_hw], dtype=torch.long),
            "stage_s": torch.zeros(self.stages, dtype=torch.float64),
        }
        handle = StagedForward(self)
        self._send("forward", msg, expect=handle)
        return handle

    # -- control ----------------------------------------------------------------------------

    def rebalance(self, ranges: list[range]) -> None:
        """Move to new layer ranges; only between forwards (the caller drains the pipeline)."""
        if self.in_flight:
            raise RuntimeError(f"rebalance with {self.in_flight} forwards in flight: drain first")
        if len(ranges) != self.stages:
            raise ValueError(f"a plan of {len(ranges)} stages for a pipeline of {self.stages}")
        check_split(ranges, self.config.num_layers)
        self._send("rebalance", {"ranges": ranges_tensor(ranges)}, expect=None, reply="rebalanced")
        self._drain_control()
        self.ranges = list(ranges)
        self._proposed = None
        self.rebalances += 1
        if self.balance is not None:
            self.balance.moved_to(self.ranges)

    def request_rebalance(self, ranges: list[range]) -> None:
        """Ask for a move to `ranges` at the next moment nothing is in flight (the executor drains
        the ring for it: see `rebalance_plan`)."""
        check_split(ranges, self.config.num_layers)
        self._proposed = list(ranges)

    def rebalance_plan(self) -> list[range] | None:
        """Ranges the pipeline should move to (requested, or proposed by the stage balance)."""
        return self._proposed

    def ping(self) -> None:
        """Round trip through every stage (start-up: every stage has built its model)."""
        self._send("ping", {}, reply="pong")
        self._drain_control()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._failure is None:
                self._send("stop", {}, reply="stopped")
                self._drain_control()
        except (PeerFailedError, PipelineFailedError):
            pass
        finally:
            if self._on_close is not None:
                self._on_close()

    # -- messages ---------------------------------------------------------------------------

    def _send(self, kind: str, tensors: dict[str, Tensor], *, expect: StagedForward | None = None,
              reply: str | None = None) -> None:
        if self._failure is not None:
            raise self._failure
        if self.closed and kind != "stop":
            raise PipelineFailedError("the pipeline is closed")
        with self._lock:
            try:
                if self._dropped:
                    ids, self._dropped = self._dropped, []
                    self.transport.send(1, "drop_prompt", {"ids": torch.tensor(ids, dtype=torch.long)},
                                        tag=RING_TAG)
                self.transport.send(1, kind, tensors, tag=RING_TAG)
            except PeerFailedError as e:
                raise self._fail(e) from e
            if expect is not None:
                self._expected.append(("forward", expect))
            elif reply is not None:
                self._expected.append((reply, None))

    def receive_one(self) -> None:
        """Receive the next reply from the last stage and hand it to whoever expects it."""
        if self._failure is not None:
            raise self._failure
        if not self._expected:
            raise RuntimeError("no reply is expected")
        try:
            kind, msg = self.transport.recv(self.depth, tag=RING_TAG, timeout_s=self.reply_timeout_s)
        except PeerFailedError as e:
            raise self._fail(e) from e
        want, handle = self._expected.popleft()
        if kind == "error" and handle is not None:
            handle.error = StageError(decode_text(msg["text"]))
            return
        if kind != want:
            raise self._fail(PeerFailedError(f"pipeline out of step: expected {want!r}, got {kind!r}"))
        if handle is not None:
            # The receive buffers are reused by the next reply: keep copies.
            handle.output = ForwardOutput(msg["x0"].clone(), split_frames(msg))
            handle.stage_s = msg["stage_s"].tolist()
            handle.decode_s = float(msg["decode_s"]) if "decode_s" in msg else 0.0
            self.stage_log.append(handle.stage_s)
            self._note_stage_times(handle.stage_s, handle.decode_s)

    def _note_stage_times(self, stage_s: list[float], decode_s: float) -> None:
        balance = self.balance
        if balance is None:
            return
        fixed = [0.0] * (self.stages - 1) + [decode_s if self._decode_on_last else 0.0]
        balance.observe([s + f for s, f in zip(stage_s, fixed, strict=True)], fixed)
        # The exact partition is cheap, but not free: look again every few forwards only.
        if self._proposed is None and balance.samples % balance.min_samples == 0:
            self._proposed = balance.proposal()

    def _drain_control(self) -> None:
        while self._expected:
            self.receive_one()

    def _fail(self, error: Exception) -> PipelineFailedError:
        """A stage is gone: fail every forward in flight, refuse everything after."""
        if self._failure is None:
            rank = getattr(error, "rank", None)
            who = "a stage"
            if isinstance(rank, int) and 0 < rank <= self.stages:
                who = f"stage {rank - 1} (rank {rank})"
            elif rank == self.stages + 1:
                who = f"the decode stage (rank {rank})"
            self._failure = PipelineFailedError(f"pipeline failed: {who} is gone: {error}")
            for _, handle in self._expected:
                if handle is not None:
                    handle.error = self._failure
            self._expected.clear()
        return self._failure
