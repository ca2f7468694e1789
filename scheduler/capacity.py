"""How much of the executor a set of sessions needs: the load estimate behind admission and
degradation. Load is GPU-seconds per second (1.0 = the executor is never idle).

A session at f fps with blocks of n frames finishes f/n blocks per second; each block costs its
forwards (steps, plus a context pass under Self-Forcing-style policies) and a decode. Sessions
of one forward shape step together, so a forward's cost is shared by the b sessions in it
(b = how many share the shape, up to the batch limit): that sharing is why batching across
streams raises capacity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.session import BlockGeometry
from rollcast.scheduler.work import BatchShape


@dataclass(frozen=True)
class LoadSpec:
    """The part of a session the load depends on."""

    geometry: BlockGeometry
    steps: int
    fps: float
    lanes: int = 1

    @property
    def forwards_per_block(self) -> int:
        if self.lanes > 1:
            return 1  # one stream-batched forward of `lanes` items per block in steady state
        return self.steps + (1 if self.geometry.context_pass else 0)


def decode_seconds(geometry: BlockGeometry, cost: CostModel) -> float:
    shape = geometry.shape
    return cost.codec_s(BatchShape(1, shape, decode_latent_frames=shape.latent_frames))


def block_seconds(spec: LoadSpec, cost: CostModel, sharing: int) -> float:
    """Executor time one block of this session costs when `sharing` sessions share each forward."""
    shape = spec.geometry.shape
    if spec.lanes > 1:
        forward = cost.predict(BatchShape(spec.lanes, shape))
    else:
        forward = cost.predict(BatchShape(sharing, shape)) / sharing
    return spec.forwards_per_block * forward + decode_seconds(spec.geometry, cost)


def load(specs: Iterable[LoadSpec], cost: CostModel, max_batch: int) -> float:
    specs = list(specs)
    per_shape = Counter(s.geometry.shape for s in specs if s.lanes == 1)
    total = 0.0
    for s in specs:
        sharing = max(1, min(per_shape[s.geometry.shape], max_batch)) if s.lanes == 1 else 1
        blocks_per_s = s.fps / s.geometry.block_frames
        total += blocks_per_s * block_seconds(s, cost, sharing)
    return total


def first_chunk_seconds(spec: LoadSpec, cost: CostModel, sharing: int) -> float:
    """Time from admission to the first chunk when each forward is shared by `sharing` sessions
    (plus one forward already in flight)."""
    shape = spec.geometry.shape
    forward = cost.predict(BatchShape(max(sharing, 1), shape))
    return (spec.steps + 1) * forward + decode_seconds(spec.geometry, cost)
