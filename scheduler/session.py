"""A stream as the scheduler sees it: its request, SLOs, progress, deadlines and statistics.

Deadlines. A block (chunk) of frames must be ready when its first frame is due for playout:
chunk 0 at `t_admitted + ttff`, and every later frame 1/fps after the previous one. A change of
fps (degradation) re-anchors the clock at the next chunk, so earlier deadlines never move.

Lanes. Normally a session runs its blocks one at a time: the steps of block b (after the previous
block's context pass, under policies that have one), then block b+1. With stream batching
(StreamDiffusionV2's baseline) it has one lane per denoising step: lane i runs step i of every
block, so up to `steps` consecutive blocks are in flight at different noise levels.

Input readiness. A video-to-video block can start only once its input frames have arrived. The
engine tells the record every tick whether the executor holds the input for the next block start
(`note_input`); until then the items that would start a block from input are held back, while work
of blocks already under way goes on. Deadlines do not move: a block whose input came late may be
late. The waits are kept so that such a miss is told apart from one the scheduler caused: a chunk
no later than the input waits of it and the blocks before it is the input's miss.

Playout pacing. A live stream is watched, not downloaded: a block may not start more than
`ttff + max_lead_s` before its deadline (`note_clock`), which bounds the frames buffered per stream
and the input-to-output latency. (The TTFF is in the bound because a viewer starts watching at the
first frame, which may come well before its deadline.) A paused session starts no blocks; on resume
its deadline clock restarts like a new stream's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rollcast.scheduler.work import ForwardShape, WorkItem

SessionState = Literal["queued", "active", "finished", "failed", "rejected"]


@dataclass(frozen=True)
class SessionSLO:
    ttff_s: float = 1.0  # request admitted -> first frames ready
    fps: float = 16.0
    # Degradation floors: a session may lose denoising steps down to `min_steps` and frame rate
    # down to `min_fps` under overload (None: it may not).
    min_steps: int | None = None
    min_fps: float | None = None
    max_miss_rate: float = 0.01  # share of chunks that may be late for the SLO to hold

    def __post_init__(self) -> None:
        if self.ttff_s <= 0 or self.fps <= 0:
            raise ValueError(f"SLO needs positive ttff and fps, got ttff {self.ttff_s}, fps {self.fps}")
        if self.min_fps is not None and not 0 < self.min_fps <= self.fps:
            raise ValueError(f"min_fps must lie in (0, fps={self.fps}], got {self.min_fps}")
        if self.min_steps is not None and self.min_steps < 1:
            raise ValueError(f"min_steps must be at least 1, got {self.min_steps}")


@dataclass(frozen=True)
class SessionRequest:
    session_id: str
    mode: Literal["t2v", "v2v"] = "t2v"
    prompt: str = ""
    seed: int = 0
    steps: int = 4
    slo: SessionSLO = field(default_factory=SessionSLO)
    duration_s: float | None = None  # None: until closed
    resolution: tuple[int, int] | None = None  # None: the model's default

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.slo.min_steps is not None and self.slo.min_steps > self.steps:
            raise ValueError(f"min_steps {self.slo.min_steps} exceeds steps {self.steps}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")


@dataclass(frozen=True)
class BlockGeometry:
    """How a session's blocks map to work and frames (fixed by the model and policy)."""

    shape: ForwardShape
    context_pass: bool  # an extra t=0 forward per block (Self-Forcing family)

    @property
    def first_block_frames(self) -> int:
        return 1 + 4 * (self.shape.latent_frames - 1)

    @property
    def block_frames(self) -> int:
        return 4 * self.shape.latent_frames

    def frames_of(self, block: int) -> int:
        return self.first_block_frames if block == 0 else self.block_frames

    def first_frame_of(self, block: int) -> int:
        return 0 if block == 0 else self.first_block_frames + (block - 1) * self.block_frames

    def blocks_for(self, frames: int) -> int:
        if frames <= self.first_block_frames:
            return 1
        return 1 + math.ceil((frames - self.first_block_frames) / self.block_frames)


@dataclass
class SessionStats:
    t_first_frame: float | None = None
    chunks: int = 0
    late_chunks: int = 0
    frames: int = 0
    max_lateness_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    input_wait_s: float = 0.0  # v2v: total time block starts waited for input frames
    input_late_chunks: int = 0  # late chunks whose lateness the input wait explains


@dataclass
class SessionRecord:
    request: SessionRequest
    geometry: BlockGeometry
    t_arrival: float
    state: SessionState = "queued"
    t_admitted: float | None = None
    t_finished: float | None = None
    steps: int = 0
    fps: float = 0.0
    lanes: int = 1
    total_blocks: int | None = None
    # The block each lane works on (lane i of a stream-batched session always runs step i) and,
    # with one lane, the next denoising step of its block.
    lane_block: list[int] = field(default_factory=lambda: [0])
    step: int = 0
    blocks_done: int = 0
    t_ready: float = 0.0  # when its current ready work became ready (FIFO order)
    context_pending: bool = False  # the last finished block's clean context pass has not run yet
    pending_steps: int | None = None  # a step-count change waiting for the next block boundary
    # Deadline clock: frame `anchor_frame` is due at `anchor_time`, later ones every 1/fps.
    anchor_time: float = 0.0
    anchor_frame: int = 0
    stats: SessionStats = field(default_factory=SessionStats)
    error: str | None = None
    # v2v: whether the executor holds the input to start the next block (`note_input`), since when
    # (and for which block) a block start has been waiting for it, each unfinished block's wait,
    # and the waits of all finished blocks (what input delayed the stream by, at most).
    input_ready: bool = True
    input_wait: tuple[int, float] | None = None
    block_input_wait_s: dict[int, float] = field(default_factory=dict)
    input_delay_s: float = 0.0
    # Playout pacing (`note_clock`): block starts are held while paused or too far ahead.
    paused: bool = False
    held: bool = False
    # Lanes with a forward in flight (submitted, not yet updated): their next forward waits.
    busy_lanes: set[int] = field(default_factory=set)

    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def slo(self) -> SessionSLO:
        return self.request.slo

    # -- lifecycle -----------------------------------------------------------------------------

    def admit(self, now: float, *, lanes: int = 1) -> None:
        self.state = "active"
        self.t_admitted = now
        self.steps = self.request.steps
        self.fps = self.slo.fps
        self.lanes = lanes
        self.lane_block = [0] * lanes
        self.step = 0
        self.anchor_time, self.anchor_frame = now + self.slo.ttff_s, 0
        self.t_ready = now
        if self.request.duration_s is not None:
            frames = max(1, math.ceil(self.request.duration_s * self.slo.fps))
            self.total_blocks = self.geometry.blocks_for(frames)

    @property
    def done(self) -> bool:
        return self.total_blocks is not None and self.blocks_done >= self.total_blocks

    # -- deadlines -----------------------------------------------------------------------------

    def deadline(self, block: int) -> float:
        frame = self.geometry.first_frame_of(block)
        return self.anchor_time + (frame - self.anchor_frame) / self.fps

    def set_fps(self, fps: float) -> None:
        """Re-anchor at the next unfinished chunk so its and later deadlines follow the new rate."""
        frame = self.geometry.first_frame_of(self.blocks_done)
        self.anchor_time, self.anchor_frame = self.deadline(self.blocks_done), frame
        self.fps = fps

    # -- work ------------------------------------------------------------------------------------

    def forwards_per_block(self) -> int:
        return self.steps + (1 if self.geometry.context_pass and self.lanes == 1 else 0)

    def ready_items(self) -> list[WorkItem]:
        """The forwards this session could run now (one per lane at most); a block start whose
        input has not arrived, or that is held by pacing or a pause, is not ready."""
        items = self._next_items()
        if self.held:
            items = [i for i in items if not i.starts_block]
        if self.input_ready:
            return items
        return [i for i in items if not i.encodes_input]

    def note_clock(self, now: float, max_lead_s: float | None) -> float | None:
        """Hold block starts while paused or more than `max_lead_s` before their deadline (the
        engine, every tick). Returns when a held start is released (None: nothing held by time)."""
        self.held = self.paused
        if self.paused or max_lead_s is None:
            return None
        starts = [i for i in self._next_items() if i.starts_block]
        if not starts:
            return None
        release = self.deadline(starts[0].block) - self.slo.ttff_s - max_lead_s
        self.held = now < release
        return release if self.held else None

    def set_paused(self, paused: bool, now: float) -> None:
        if self.paused and not paused:  # resume: deadlines restart as for a new stream
            frame = self.geometry.first_frame_of(self.blocks_done)
            self.anchor_time, self.anchor_frame = now + self.slo.ttff_s, frame
        self.paused = paused

    def _next_items(self) -> list[WorkItem]:
        if self.state != "active":
            return []
        items = self._single_lane_item() if self.lanes == 1 else self._lane_items()
        return [i for i in items if i.lane not in self.busy_lanes] if self.busy_lanes else items

    def note_input(self, ready: bool, now: float) -> None:
        """Whether the executor holds the input for this session's next block start (the engine,
        every tick); times how long a due block start waits for it."""
        self.input_ready = ready
        waiting = None if ready else next((i.block for i in self._next_items() if i.encodes_input), None)
        if self.input_wait is not None and waiting != self.input_wait[0]:
            block, since = self.input_wait
            self.block_input_wait_s[block] = self.block_input_wait_s.get(block, 0.0) + now - since
            self.stats.input_wait_s += now - since
            self.input_wait = None
        if waiting is not None and self.input_wait is None:
            self.input_wait = (waiting, now)

    def _single_lane_item(self) -> list[WorkItem]:
        block = self.lane_block[0]
        if self.total_blocks is not None and block >= self.total_blocks:
            return []
        # A pending context pass commits block-1's clean K/V before block's first step, so it
        # counts towards block's deadline.
        if self.context_pending:
            return [WorkItem(self.session_id, 0, block, self.steps, "context", self.geometry.shape,
                             finishes_block=False, deadline=self.deadline(block))]
        step = self.step
        return [WorkItem(self.session_id, 0, block, step, "denoise", self.geometry.shape,
                         finishes_block=step == self.steps - 1, deadline=self.deadline(block),
                         encodes_input=self.request.mode == "v2v" and step == 0)]

    def _lane_items(self) -> list[WorkItem]:
        items = []
        for lane in range(self.lanes):
            block = self.lane_block[lane]
            if self.total_blocks is not None and block >= self.total_blocks:
                continue
            # Lane i takes block b after lane i-1 has finished it; lane 0 stays within `lanes`
            # blocks of the last lane (the stream batch's depth).
            if lane > 0 and self.lane_block[lane - 1] <= block:
                continue
            if lane == 0 and block - self.lane_block[-1] >= self.lanes:
                continue
            items.append(WorkItem(self.session_id, lane, block, lane, "denoise", self.geometry.shape,
                                  finishes_block=lane == self.lanes - 1, deadline=self.deadline(block),
                                  encodes_input=self.request.mode == "v2v" and lane == 0))
        return items

    def remaining_s(self, item: WorkItem, forward_s: float, decode_s: float) -> float:
        """Predicted work left for `item`'s block including the item itself (one item at a time)."""
        if self.lanes > 1:
            left = self.lanes - item.lane
        elif item.kind == "context":
            left = 1 + self.steps
        else:
            left = self.steps - item.step
        return left * forward_s + decode_s

    def set_steps(self, steps: int) -> None:
        """Change the denoising steps from the next block on (a block never mixes schedules)."""
        if self.lanes > 1:
            raise ValueError("a stream-batched session keeps its step count (one lane per step)")
        self.pending_steps = steps

    def advance(self, item: WorkItem) -> bool:
        """Record that `item` ran; True when it finished its block."""
        if self.lanes > 1:
            self.lane_block[item.lane] += 1
        elif item.kind == "context":
            self.context_pending = False
            return False
        elif item.step + 1 < self.steps:
            self.step = item.step + 1
            return False
        else:
            self.lane_block[0] += 1
            self.step = 0
            self.context_pending = self.geometry.context_pass
            if self.pending_steps is not None:
                self.steps, self.pending_steps = self.pending_steps, None
        if item.finishes_block:
            self.blocks_done += 1
        return item.finishes_block
