"""The prediction type (eps, x0, v) and v-parameterised training, against diffusers' schedulers."""
import copy

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from ldm.models.diffusion.prediction import Prediction
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule

# SD's schedule in diffusers' terms ("scaled_linear" is the original's "linear": betas linear in sqrt)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def v_model(tiny_config):
    config = copy.deepcopy(tiny_config)
    config.model.params.parameterization = "v"
    return build_tiny_model(config)


def sample_tensors(seed=0, shape=(3, 4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_v_training_target_is_diffusers_velocity(tiny_config):
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(prediction_type="v_prediction", **SD_SCHEDULE)
    model = v_model(tiny_config)
    assert model.prediction.kind == "v"
    torch.testing.assert_close(model.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)

    x0, noise = sample_tensors()
    t = torch.tensor([0, 420, 999])
    velocity = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(model.get_v(x0, noise, t), velocity, atol=1e-5, rtol=1e-5)
    # the training loss really regresses the model output on the velocity
    outputs = []
    real = model.apply_model
    model.apply_model = lambda *a, **k: outputs.append(real(*a, **k)) or outputs[-1]
    c = model.get_learned_conditioning(["a photo of *"] * 3)
    with torch.no_grad():
        _, loss_dict = model.p_losses(x0, t, cond=c, noise=noise)
    expected = (outputs[0] - velocity).square().mean()
    torch.testing.assert_close(loss_dict["val/loss_simple"], expected, atol=1e-5, rtol=1e-5)
    # and a v model's VLB weights are ones, as in Stability's SD 2.x code
    assert torch.equal(model.lvlb_weights, torch.ones(1000))


@pytest.mark.parametrize("step", [0, 10, 25, 49])
def test_v_conversions_agree_with_diffusers_ddim_v_prediction(tiny_config, step):
    """The same model output, converted by our helpers and by diffusers' DDIMScheduler(v_prediction)."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              **SD_SCHEDULE)
    scheduler.set_timesteps(50)
    t = int(scheduler.timesteps[step])
    model = v_model(tiny_config)
    x_t, out = sample_tensors(seed=step)
    tt = torch.full((x_t.shape[0],), t)
    ours_x0 = model.predict_start_from_z_and_v(x_t, tt, out)
    ours_eps = model.predict_eps_from_z_and_v(x_t, tt, out)
    step_out = scheduler.step(out, t, x_t, eta=0.)
    torch.testing.assert_close(ours_x0, step_out.pred_original_sample, atol=1e-5, rtol=1e-5)
    prev_t = t - 1000 // 50
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    # deterministic DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, so this also checks our eps
    ours_prev = a_prev.sqrt() * ours_x0 + (1 - a_prev).sqrt() * ours_eps
    torch.testing.assert_close(ours_prev, step_out.prev_sample, atol=1e-5, rtol=1e-5)
    # the Prediction object gives the same as the model's helpers
    a_t = extract_into_tensor(model.alphas_cumprod, tt, x_t.shape)
    torch.testing.assert_close(Prediction("v").to_eps(x_t, out, a_t), ours_eps)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_every_kind_converts_its_own_target_back(kind):
    x0, noise = sample_tensors(seed=3)
    a_t = torch.tensor([0.999, 0.5, 0.01]).reshape(3, 1, 1, 1)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    prediction = Prediction(kind)
    out = prediction.target(x0, noise, a_t)
    torch.testing.assert_close(prediction.to_x0(x_t, out, a_t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prediction.to_eps(x_t, out, a_t), noise, atol=1e-4, rtol=1e-4)


def test_eps_and_x0_training_is_unchanged(tiny_config):
    """eps/x0 targets are the noise / the sample themselves, and their VLB weights the original's expressions."""
    model = build_tiny_model(tiny_config)
    x0, noise = sample_tensors()
    a_t = torch.rand(3, 1, 1, 1)
    assert model.prediction.target(x0, noise, a_t) is noise
    assert Prediction("x0").target(x0, noise, a_t) is x0
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    alphas = torch.tensor(1. - np.asarray(betas, dtype=np.float64), dtype=torch.float32)
    original_eps = model.betas ** 2 / (2 * model.posterior_variance * alphas * (1 - model.alphas_cumprod))
    original_eps[0] = original_eps[1]
    assert torch.equal(model.lvlb_weights, original_eps)
    with pytest.raises(ValueError, match="parameterization must be one of 'eps', 'x0', 'v', got 'velocity'"):
        Prediction("velocity")


def test_v_model_ancestral_step_uses_the_v_conversion(tiny_config):
    model = v_model(tiny_config)
    x_t, _ = sample_tensors(seed=4)
    t = torch.tensor([999, 500, 10])
    c = model.get_learned_conditioning(["a photo of *"] * 3)
    with torch.no_grad():
        out = model.apply_model(x_t, t, c)
        mean, _, _ = model.p_mean_variance(x_t, t, clip_denoised=False, cond=c)
    expected, _, _ = model.q_posterior(model.predict_start_from_z_and_v(x_t, t, out), x_t, t)
    torch.testing.assert_close(mean, expected)
