"""The motion-aware noise controller: still input keeps the initial level, motion lowers it, the
smoothing carries the previous level, and the first chunk is never adapted."""

from __future__ import annotations

import itertools

import pytest
import torch

from rollcast.workers.noise_controller import (
    MotionNoiseController,
    NoiseControllerConfig,
    motion_magnitude,
)


def still(value: float = 0.1, frames: int = 4) -> torch.Tensor:
    return torch.full((1, 3, frames, 8, 8), value)


def moving(seed: int, frames: int = 4) -> torch.Tensor:
    return torch.rand(1, 3, frames, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_motion_magnitude_is_the_max_rms_frame_difference() -> None:
    chunk = torch.zeros(1, 3, 4, 8, 8)
    chunk[:, :, 2:] = 0.1  # one step of 0.1 between frames 1 and 2
    chunk[:, :, 3] = 0.4  # a step of 0.3 between frames 2 and 3: the max
    assert motion_magnitude(chunk, None).item() == pytest.approx(0.3)
    prev = torch.full((1, 3, 1, 8, 8), -0.5)  # 0.5 to the chunk's first frame
    assert motion_magnitude(chunk, prev).item() == pytest.approx(0.5)


def test_static_input_keeps_the_initial_noise_level() -> None:
    ctl = MotionNoiseController()
    prev = None
    for _ in range(10):
        chunk = still()
        scale, t0 = ctl.update(chunk, prev)
        prev = chunk[:, :, -1:]
        assert scale == pytest.approx(0.8)
        assert t0 == 700.0


def test_strong_motion_lowers_the_noise_level_towards_the_floor() -> None:
    ctl = MotionNoiseController()
    first, _ = ctl.update(moving(0), None)
    assert first == pytest.approx(0.8)  # no predecessor: the first chunk is not adapted
    prev = moving(0)[:, :, -1:]
    scales, steps = [], []
    for i in range(1, 8):
        chunk = moving(i)  # uniform noise in [-1, 1]: RMS difference ~0.8 >> 0.2 -> d = 1
        s, t0 = ctl.update(chunk, prev)
        prev = chunk[:, :, -1:]
        scales.append(s)
        steps.append(t0)
    assert scales[0] == pytest.approx(0.9 * 0.7 + 0.1 * 0.8)  # 0.71
    assert steps[0] == 610.0  # int(1000 * 0.71) - 100
    assert all(a >= b for a, b in itertools.pairwise(scales))
    assert scales[-1] == pytest.approx(0.7, abs=1e-6)


def test_smoothing_carries_a_tenth_of_the_previous_level() -> None:
    ctl = MotionNoiseController()
    ctl.update(still(0.0), None)
    s_spike, _ = ctl.update(still(1.0), still(0.0)[:, :, -1:])  # a jump of 1.0: full motion
    assert s_spike == pytest.approx(0.71)
    s_after, _ = ctl.update(still(1.0), still(1.0)[:, :, -1:])  # still again
    assert s_after == pytest.approx(0.9 * 0.8 + 0.1 * 0.71)
    half, _ = MotionNoiseController().update(still(0.1), still(0.0)[:, :, -1:])  # d = 0.1 -> d̂ = 0.5
    assert half == pytest.approx(0.9 * (0.8 - 0.05) + 0.1 * 0.8)


def test_fixed_noise_ignores_motion() -> None:
    ctl = MotionNoiseController(NoiseControllerConfig(init_scale=0.6, adaptive=False))
    s, t0 = ctl.update(moving(1), moving(2)[:, :, -1:])
    assert (s, t0) == (0.6, 500.0)


@pytest.mark.parametrize("kwargs", [{"init_scale": 0.0}, {"init_scale": 1.5}, {"scale_drop": 0.9},
                                    {"motion_scale": 0.0}, {"smoothing": 0.0}])
def test_bad_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        NoiseControllerConfig(**kwargs)
