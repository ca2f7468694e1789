"""Session arrival processes, shared by the simulator and the load generator.

Poisson arrivals have exponential gaps. Gamma arrivals have the same mean gap (1/rate) with a
coefficient of variation `burstiness`: 1 is Poisson again, above 1 clusters arrivals into bursts,
below 1 spreads them towards a fixed rhythm (the convention of vLLM's serving benchmark).
"""

from __future__ import annotations

import random
from typing import Literal

ARRIVALS = ("poisson", "gamma")
Arrival = Literal["poisson", "gamma"]


def arrival_times(rate: float, duration_s: float, *, arrival: Arrival = "poisson",
                  burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival offsets in [0, duration_s) in seconds; the same seed gives the same list."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration_s}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r}; choose one of {ARRIVALS}")
    rng = random.Random(seed)
    shape = 1.0 / (burstiness ** 2)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate) if arrival == "poisson" else rng.gammavariate(shape, 1.0 / (rate * shape))
        if t >= duration_s:
            return times
        times.append(t)
