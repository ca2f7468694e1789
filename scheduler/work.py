"""What the scheduler hands an executor: descriptions of forwards, never tensors.

A *work item* is one forward slot of one session: the next denoising step (or clean context pass)
of the block on one of the session's lanes. A session normally has one lane; under stream batching
(StreamDiffusionV2's "stream batch") it has one lane per denoising step, lane i always running step
i, so consecutive blocks of the session are in flight at different noise levels at once.

A *micro-batch* is a list of work items with the same forward shape (`BatchShape`) that run as one
forward. A *step plan* is what one engine tick submits: one micro-batch per executor slot.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

WorkKind = Literal["denoise", "context", "recache"]


@dataclass(frozen=True)
class ForwardShape:
    """The geometry that decides a forward's cost and which items may share it."""

    latent_frames: int  # latent frames per item (frames per block; the window for a re-cache)
    tokens_per_frame: int
    kv_frames: int  # frames of keys each query attends to (window incl. the block itself)
    resolution: tuple[int, int]  # (width, height): items of different resolutions never batch

    @property
    def tokens(self) -> int:
        return self.latent_frames * self.tokens_per_frame

    @property
    def kv_tokens(self) -> int:
        return self.kv_frames * self.tokens_per_frame


@dataclass(frozen=True)
class WorkItem:
    session_id: str
    lane: int
    block: int  # the session's block index this forward belongs to
    step: int  # denoising step index (== number of steps for a context pass)
    kind: WorkKind
    shape: ForwardShape
    finishes_block: bool  # its output is the block's final latents (decode follows)
    deadline: float  # when the block's frames must be ready (engine clock)
    encodes_input: bool = False  # v2v: the block's input frames are encoded before this forward

    @property
    def starts_block(self) -> bool:
        """The first forward of a block (step 0 on lane 0): what pacing and pauses hold back."""
        return self.kind == "denoise" and self.lane == 0 and self.step == 0


@dataclass(frozen=True)
class BatchShape:
    """A micro-batch as the cost model sees it."""

    size: int
    shape: ForwardShape
    decode_latent_frames: int = 0  # latent frames decoded after the forward (finished blocks)
    encode_latent_frames: int = 0  # v2v input encoded before it


_plan_ids = itertools.count()


@dataclass
class MicroBatch:
    items: list[WorkItem]
    predicted_s: float = 0.0
    plan_id: int = field(default_factory=lambda: next(_plan_ids))

    @property
    def shape(self) -> ForwardShape:
        return self.items[0].shape

    def batch_shape(self) -> BatchShape:
        decode = sum(i.shape.latent_frames for i in self.items if i.finishes_block)
        encode = sum(i.shape.latent_frames for i in self.items if i.encodes_input)
        return BatchShape(len(self.items), self.shape, decode_latent_frames=decode,
                          encode_latent_frames=encode)


@dataclass
class BatchResult:
    """What an executor reports for one finished micro-batch."""

    batch: MicroBatch
    started: float
    finished: float
    # Frames of the blocks this batch finished, by session: uint8 [T, H, W, 3] from a real
    # executor, None in simulation (the engine knows how many frames a block has).
    frames: dict[str, object | None] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # session_id -> error, that session only
    stages: dict[str, float] = field(default_factory=dict)  # seconds by stage (executor-defined)
    # The executor's pipeline is gone (a stage process/actor died): why. Every session on it is
    # lost; the engine ends them and has the executor `rebuild`.
    lost: str | None = None

    @property
    def seconds(self) -> float:
        return self.finished - self.started
