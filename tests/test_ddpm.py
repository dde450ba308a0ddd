"""Training-objective options of DDPM/LatentDiffusion that are not in the original."""
import copy

import pytest
import torch

from conftest import build_tiny_model


def with_params(config, **params):
    config = copy.deepcopy(config)
    for key, value in params.items():
        config.model.params[key] = value
    return config


def test_training_timesteps_stay_in_the_configured_range(tiny_config):
    model = build_tiny_model(with_params(tiny_config, min_timestep=700, max_timestep=900))
    t = model.sample_timesteps(4096, torch.device("cpu"))
    assert int(t.min()) == 700 and int(t.max()) == 899
    # the default is the whole schedule
    t = build_tiny_model(tiny_config).sample_timesteps(4096, torch.device("cpu"))
    assert int(t.min()) < 10 and int(t.max()) > model.num_timesteps - 10


def test_full_range_fraction_mixes_the_whole_schedule_in(tiny_config):
    model = build_tiny_model(with_params(tiny_config, min_timestep=700, full_range_fraction=0.25))
    t = model.sample_timesteps(20000, torch.device("cpu"))
    low = (t < 700).float().mean().item()
    # a quarter of the draws come from [0, 1000), of which 70% land below 700
    assert abs(low - 0.25 * 0.7) < 0.02 and int(t.max()) <= 999 and int(t.min()) < 10
    # off (the default) draws exactly what the plain range draws
    plain = build_tiny_model(with_params(tiny_config, min_timestep=700))
    zero = build_tiny_model(with_params(tiny_config, min_timestep=700, full_range_fraction=0.0))
    torch.manual_seed(0)
    a = plain.sample_timesteps(64, torch.device("cpu"))
    torch.manual_seed(0)
    b = zero.sample_timesteps(64, torch.device("cpu"))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="full_range_fraction"):
        build_tiny_model(with_params(tiny_config, full_range_fraction=1.5))


def test_the_training_step_uses_the_range(tiny_config, monkeypatch):
    model = build_tiny_model(with_params(tiny_config, min_timestep=500))
    seen = []
    real = model.p_losses
    monkeypatch.setattr(model, "p_losses", lambda x, t, *a, **k: seen.append(t) or real(x, t, *a, **k))
    batch = {"image": torch.rand(3, model.image_size * 4, model.image_size * 4, 3) * 2 - 1,
             "caption": ["a photo of *"] * 3}
    model.train()
    model.shared_step(batch)
    assert seen and int(seen[0].min()) >= 500


@pytest.mark.parametrize("lo,hi", [(-1, None), (500, 500), (0, 2000)])
def test_a_bad_range_is_refused_with_its_values(tiny_config, lo, hi):
    with pytest.raises(ValueError, match="min_timestep"):
        build_tiny_model(with_params(tiny_config, min_timestep=lo, max_timestep=hi))


def test_num_timesteps_cond_of_the_official_configs_is_accepted_and_another_value_refused(tiny_config):
    assert build_tiny_model(with_params(tiny_config, num_timesteps_cond=1)) is not None
    with pytest.raises(ValueError, match="num_timesteps_cond 2: only 1"):
        build_tiny_model(with_params(tiny_config, num_timesteps_cond=2))
