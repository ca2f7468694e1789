"""Online rebalancing: watch the stages' measured compute times and propose new layer ranges when
the slowest stage could be made clearly faster.

Each stage's time per layer (its smoothed forward time over its layer count) stands for that
device's speed, so a slower GPU, a stage that also embeds or runs the head, or a neighbour on a
busy host all show up the same way. A stage's fixed work that does not move with its layers (the
VAE decode on the last stage) is measured apart and kept as that device's fixed cost. The exact
partition (`plan_partition`) over those speeds
gives the best split; it is proposed when it would cut the bottleneck by `min_gain` or more.
Unlike StreamDiffusionV2's one-shot rebalance it keeps watching, so a drift later in the run
(load on a shared host, a throttled GPU) triggers another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rollcast.pipeline_parallel.partition import DeviceSpec, LayerCost, plan_partition


@dataclass
class StageBalance:
    ranges: list[range]
    alpha: float = 0.2  # EWMA weight of a new sample
    min_samples: int = 8  # forwards observed (since the last change) before proposing anything
    min_gain: float = 0.15  # propose only when the bottleneck drops by at least this share
    _smoothed: list[float] = field(default_factory=list)
    _fixed: list[float] = field(default_factory=list)
    _samples: int = 0

    def observe(self, stage_s: list[float], fixed_s: list[float] | None = None) -> None:
        """One forward's seconds per stage, of which `fixed_s` do not depend on the layers held."""
        if len(stage_s) != len(self.ranges) or min(stage_s) <= 0:
            return  # a stage that reported nothing (its timer lags on CUDA): skip the sample
        fixed = list(fixed_s) if fixed_s is not None else [0.0] * len(stage_s)
        if not self._smoothed:
            self._smoothed, self._fixed = list(stage_s), fixed
        else:
            self._smoothed = self._ewma(self._smoothed, stage_s)
            self._fixed = self._ewma(self._fixed, fixed)
        self._samples += 1

    def _ewma(self, old: list[float], new: list[float]) -> list[float]:
        a = self.alpha
        return [(1 - a) * m + a * s for m, s in zip(old, new, strict=True)]

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def stage_times(self) -> list[float]:
        return list(self._smoothed)

    def proposal(self) -> list[range] | None:
        """New ranges worth moving to, or None."""
        if self._samples < self.min_samples or len(self.ranges) < 2:
            return None
        per_layer = [max(t - f, 1e-9) / len(r)
                     for t, f, r in zip(self._smoothed, self._fixed, self.ranges, strict=True)]
        num_layers = self.ranges[-1].stop
        devices = [DeviceSpec(f"stage{i}", speed=1.0 / c, fixed_s=f)
                   for i, (c, f) in enumerate(zip(per_layer, self._fixed, strict=True))]
        plan = plan_partition([LayerCost(1.0, 0)] * num_layers, devices)
        if list(plan.ranges) == self.ranges or plan.bottleneck_s > (1 - self.min_gain) * max(self._smoothed):
            return None
        return list(plan.ranges)

    def moved_to(self, ranges: list[range]) -> None:
        """The pipeline now runs `ranges`: start measuring afresh."""
        self.ranges = list(ranges)
        self._smoothed, self._fixed, self._samples = [], [], 0
