"""Block scheduler: split the DiT's layers into contiguous stage ranges, one per device.

A pipeline's throughput is one micro-batch per *slowest* stage time, so the split minimises
max over stages of (its layers' time / the device's speed + the stage's fixed cost), subject to
each stage's layers fitting in its device's memory. StreamDiffusionV2 splits evenly and later
nudges the boundaries once from measured times (reference/streamdiffusionv2.md 3b); here the split
is solved exactly from a per-layer profile, so heterogeneous devices and the VAE on the edge
stages are balanced from the start.

The solver is an exact dynamic programme over (stage, layers covered), O(S·L²). Among the plans
with the optimal bottleneck it returns the one with the smallest sum of squared stage times (the
non-bottleneck stages balanced too, leaving headroom everywhere), and among those the one with
the earliest boundaries, so the result is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

# Two stage times closer than this (relative) are treated as equal, so float noise from prefix
# sums cannot make the tie-break depend on summation order.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    speed: float = 1.0  # relative throughput: a layer costing c s on speed 1 takes c / speed here
    memory_bytes: int | None = None  # limit for this stage's layers; None = unlimited
    fixed_s: float = 0.0  # seconds this stage always pays (embed/head/VAE on the edge stages)


@dataclass(frozen=True)
class LayerCost:
    time_s: float  # seconds on a speed-1 device
    bytes: int  # weights + KV cache bytes the layer needs


@dataclass(frozen=True)
class PartitionPlan:
    ranges: tuple[range, ...]
    stage_s: tuple[float, ...]
    bottleneck_s: float
    devices: tuple[str, ...] = ()
    stage_bytes: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "bottleneck_s": self.bottleneck_s,
            "stages": [
                {"device": name, "start": r.start, "stop": r.stop, "layers": len(r), "seconds": s,
                 "bytes": b}
                for r, s, name, b in zip(self.ranges, self.stage_s, self.devices, self.stage_bytes,
                                         strict=True)
            ],
        }

    def format(self) -> str:
        """A fixed-width table, one row per stage."""
        rows = [f"{'stage':>5}  {'device':<12} {'layers':>9} {'count':>5} {'seconds':>10} {'GB':>8} "
                f"{'share':>6}"]
        for i, (r, s, name, b) in enumerate(
                zip(self.ranges, self.stage_s, self.devices, self.stage_bytes, strict=True)):
            share = s / self.bottleneck_s if self.bottleneck_s > 0 else 1.0
            rows.append(f"{i:>5}  {name:<12} {f'{r.start}..{r.stop - 1}':>9} {len(r):>5} "
                        f"{s:>10.6f} {b / 1e9:>8.3f} {share:>6.1%}")
        rows.append(f"bottleneck {self.bottleneck_s:.6f} s per micro-step")
        return "\n".join(rows)


def even_ranges(num_layers: int, stages: int) -> list[range]:
    """StreamDiffusionV2's default split: equal sizes, the remainder to the first ranks."""
    if stages < 1 or num_layers < stages:
        raise ValueError(f"cannot split {num_layers} layers into {stages} non-empty stages")
    base, extra = divmod(num_layers, stages)
    sizes = [base + (i < extra) for i in range(stages)]
    bounds = [0, *accumulate(sizes)]
    return [range(a, b) for a, b in pairwise(bounds)]


def check_split(ranges: Sequence[range], num_layers: int) -> None:
    """Raise ValueError unless `ranges` split layers 0..num_layers-1 into contiguous, non-empty
    stages in order."""
    starts = [0, *(r.stop for r in ranges[:-1])]
    if (not ranges or ranges[-1].stop != num_layers
            or any(r.start != s or r.step != 1 or not len(r) for r, s in zip(ranges, starts, strict=True))):
        raise ValueError(f"layer ranges {list(ranges)} do not split {num_layers} layers into "
                         f"contiguous, non-empty stages")


def evaluate_ranges(
    ranges: Sequence[range], layers: Sequence[LayerCost], devices: Sequence[DeviceSpec]
) -> PartitionPlan:
    """The predicted stage times of a given split (memory limits are not checked)."""
    _validate(layers, devices)
    if len(ranges) != len(devices):
        raise ValueError(f"{len(ranges)} ranges for {len(devices)} devices")
    if [r.start for r in ranges] != [0, *(r.stop for r in ranges[:-1])] or ranges[-1].stop != len(layers):
        raise ValueError(f"ranges {list(ranges)} do not cover 0..{len(layers) - 1} contiguously")
    times = tuple(_stage_time(layers[r.start:r.stop], d) for r, d in zip(ranges, devices, strict=True))
    return PartitionPlan(tuple(ranges), times, max(times), tuple(d.name for d in devices),
                         tuple(sum(c.bytes for c in layers[r.start:r.stop]) for r in ranges))


def plan_partition(layers: Sequence[LayerCost], devices: Sequence[DeviceSpec]) -> PartitionPlan:
    """Contiguous non-empty ranges, in device order, minimising the slowest stage (exact)."""
    _validate(layers, devices)
    n, s = len(layers), len(devices)
    if s > n:
        raise ValueError(f"{s} stages but only {n} layers: every stage needs at least one layer")
    times = [0.0, *accumulate(c.time_s for c in layers)]
    sizes = [0, *accumulate(c.bytes for c in layers)]

    def cost(k: int, a: int, b: int) -> float:
        """Stage k holding layers a..b-1; inf when they do not fit its memory."""
        d = devices[k]
        if d.memory_bytes is not None and sizes[b] - sizes[a] > d.memory_bytes:
            return math.inf
        return (times[b] - times[a]) / d.speed + d.fixed_s

    # Pass 1: best[k][j] = smallest bottleneck covering layers 0..j-1 with stages 0..k-1.
    best = [[math.inf] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    for k in range(1, s + 1):
        for j in range(k, n - (s - k) + 1):
            best[k][j] = min((max(best[k - 1][i], cost(k - 1, i, j)) for i in range(k - 1, j)),
                             default=math.inf)
    bottleneck = best[s][n]
    if math.isinf(bottleneck):
        raise ValueError(_memory_diagnosis(layers, devices, sizes))
    # Pass 2: among splits whose every stage is within the optimum, minimise the sum of squares;
    # strict '<' while scanning i upwards keeps the earliest boundary on ties.
    limit = bottleneck * (1 + _REL_TOL) + 1e-15
    sq = [[math.inf] * (n + 1) for _ in range(s + 1)]
    back = [[0] * (n + 1) for _ in range(s + 1)]
    sq[0][0] = 0.0
    for k in range(1, s + 1):
        for j in range(k, n - (s - k) + 1):
            for i in range(k - 1, j):
                c = cost(k - 1, i, j)
                if c <= limit and sq[k - 1][i] + c * c < sq[k][j] * (1 - _REL_TOL):
                    sq[k][j], back[k][j] = sq[k - 1][i] + c * c, i
    bounds = [n]
    for k in range(s, 0, -1):
        bounds.append(back[k][bounds[-1]])
    bounds.reverse()
    ranges = [range(a, b) for a, b in pairwise(bounds)]
    return evaluate_ranges(ranges, layers, devices)


def _stage_time(layers: Sequence[LayerCost], device: DeviceSpec) -> float:
    return math.fsum(c.time_s for c in layers) / device.speed + device.fixed_s


def _validate(layers: Sequence[LayerCost], devices: Sequence[DeviceSpec]) -> None:
    if not layers or not devices:
        raise ValueError(f"need at least one layer and one device, got {len(layers)} and {len(devices)}")
    for i, c in enumerate(layers):
        if not (math.isfinite(c.time_s) and c.time_s >= 0) or c.bytes < 0:
            raise ValueError(f"layer {i}: time_s and bytes must be finite and >= 0, got {c}")
    for d in devices:
        if not (math.isfinite(d.speed) and d.speed > 0):
            raise ValueError(f"device {d.name!r}: speed must be a finite number > 0, got {d.speed}")
        if not (math.isfinite(d.fixed_s) and d.fixed_s >= 0):
            raise ValueError(f"device {d.name!r}: fixed_s must be a finite number >= 0, got {d.fixed_s}")
        if d.memory_bytes is not None and d.memory_bytes < 0:
            raise ValueError(f"device {d.name!r}: memory_bytes must be >= 0, got {d.memory_bytes}")


def _memory_diagnosis(layers: Sequence[LayerCost], devices: Sequence[DeviceSpec], sizes: list[int]) -> str:
    """Why no split fits: the device whose limit is the smallest shortfall away from a fit."""
    n, s = len(layers), len(devices)

    def fits(k: int, a: int, b: int) -> bool:
        limit = devices[k].memory_bytes
        return limit is None or sizes[b] - sizes[a] <= limit

    # fwd[k][j]: stages 0..k-1 can hold layers 0..j-1; bwd[k][i]: stages k..s-1 can hold i..n-1.
    fwd = [[False] * (n + 1) for _ in range(s + 1)]
    fwd[0][0] = True
    for k in range(1, s + 1):
        for j in range(1, n + 1):
            fwd[k][j] = any(fwd[k - 1][i] and fits(k - 1, i, j) for i in range(j))
    bwd = [[False] * (n + 1) for _ in range(s + 1)]
    bwd[s][n] = True
    for k in range(s - 1, -1, -1):
        for i in range(n):
            bwd[k][i] = any(bwd[k + 1][j] and fits(k, i, j) for j in range(i + 1, n + 1))
    best: tuple[int, int, int] | None = None  # (shortfall, device, bytes needed)
    for k, d in enumerate(devices):
        needs = [sizes[b] - sizes[a] for a in range(n) for b in range(a + 1, n + 1)
                 if fwd[k][a] and bwd[k + 1][b]]
        if needs and d.memory_bytes is not None:
            shortfall = min(needs) - d.memory_bytes
            if best is None or shortfall < best[0]:
                best = (shortfall, k, min(needs))
    if best is None:
        return (f"no contiguous split of {n} layers ({sizes[-1]} bytes) fits the memory limits "
                f"{[d.memory_bytes for d in devices]}, even raising any single device's limit")
    _, k, need = best
    return (f"no contiguous split fits the memory limits: device {devices[k].name!r} (stage {k}) holds "
            f"{devices[k].memory_bytes} bytes but needs at least {need} bytes with the other devices "
            f"at their limits")
