from __future__ import annotations

import pytest
import torch

from rollcast.workers.sampler import FlowMatchSampler, SamplerConfig


def test_warped_self_forcing_steps_shift_5():
    s = FlowMatchSampler(SamplerConfig.preset("self-forcing"))
    assert s.timesteps() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert s.timesteps(2) == pytest.approx([1000.0, 833.3333], abs=1e-3)
    assert s.timesteps(1) == [1000.0]


def test_warped_shift_8():
    s = FlowMatchSampler(SamplerConfig(shift=8.0))
    assert s.timesteps() == pytest.approx([1000.0, 960.0, 888.8889, 727.2727], abs=1e-3)


def test_sdv2_prefix_steps_unwarped():
    s = FlowMatchSampler(SamplerConfig.preset("streamdiffusionv2-v2v"))
    assert s.timesteps(2) == [700.0, 500.0]
    assert s.timesteps(3) == [700.0, 500.0, 400.0]


def test_sigma_is_nearest_grid_point():
    s = FlowMatchSampler(SamplerConfig(shift=5.0))
    assert s.sigma(1000.0) == 1.0
    assert s.sigma(937.5) == pytest.approx(0.9375)
    assert s.sigma(0.0) == 0.0
    # Unwarped t=750 under shift 8: nearest grid timestep, close to but not exactly 0.75.
    s8 = FlowMatchSampler(SamplerConfig(shift=8.0))
    grid = torch.tensor(s8._grid_t)
    nearest = grid[(grid - 750).abs().argmin()].item() / 1000
    assert s8.sigma(750.0) == pytest.approx(nearest)
    assert abs(nearest - 0.75) < 0.01


def test_noise_and_x0_are_inverse():
    x0 = torch.randn(2, 16, 3, 4, 4)
    eps = torch.randn_like(x0)
    sig = torch.tensor([0.3, 0.9]).view(-1, 1, 1, 1, 1)
    xt = FlowMatchSampler.add_noise(x0, eps, sig)
    v = eps - x0  # the flow the model is trained to predict
    torch.testing.assert_close(FlowMatchSampler.to_x0(xt, v, sig), x0)


@pytest.mark.parametrize("bad", [dict(shift=0), dict(trained_steps=()), dict(trained_steps=(500.0, 900.0)),
                                 dict(trained_steps=(1200.0,))])
def test_bad_sampler_config_is_rejected(bad):
    with pytest.raises(ValueError, match="sampler"):
        SamplerConfig(**bad)


def test_bad_step_count_is_rejected():
    s = FlowMatchSampler(SamplerConfig())
    with pytest.raises(ValueError, match="between 1 and 4"):
        s.timesteps(5)
