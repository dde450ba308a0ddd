"""The k-diffusion style samplers (ldm/models/diffusion/sampling.py) against diffusers' schedulers, step for step.

Both loops drive the same model (the tiny LatentDiffusion of the test configs, guidance 5 with cond and uncond
in one batch) from the same start noise; the timesteps the model is called with, the sigma schedule and the
final latents must agree. Stochastic samplers get the same noise: Euler ancestral from one seeded generator,
DPM++ SDE from our Brownian noise handed to diffusers' scheduler in place of its torchsde tree.
"""
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.models.diffusion import sampling  # noqa: E402
from ldm.models.diffusion.generate import K_SAMPLERS, SAMPLERS, KSampler, generate, make_sampler  # noqa: E402
from ldm.models.diffusion.sampling_util import cat_conditioning  # noqa: E402

SCALE = 5.0
BATCH = 2
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def tiny_ldm(tiny_config):
    from conftest import build_tiny_model
    return build_tiny_model(tiny_config)


@pytest.fixture(scope="module")
def conditioning(tiny_ldm):
    return (tiny_ldm.get_learned_conditioning(["a photo of *", "a red circle"]),
            tiny_ldm.get_learned_conditioning(BATCH * [""]))


class RecordingModel:
    """Wraps the model to record the timesteps it is called with."""

    def __init__(self, model):
        self.model, self.timesteps = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply_model(self, x, t, cond):
        self.timesteps.append(float(t[0]))
        return self.model.apply_model(x, t, cond)


def diffusers_scheduler(name, model):
    schedulers = {
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                            "use_karras_sigmas": True}),
        "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
        "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
        "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2", "predict_x0": True}),
    }
    cls, config = schedulers[name]
    return getattr(diffusers, cls)(num_train_timesteps=model.num_timesteps, trained_betas=model.betas.numpy(),
                                   prediction_type="epsilon", **config)


class SnappedNoise:
    """Our Brownian noise, asked at diffusers' float32 sigmas snapped to the float64 ones our sampler uses."""

    def __init__(self, noise, sigmas):
        self.noise = noise
        self.known = sorted(set(sigmas) | {math.sqrt(a * b) for a, b in zip(sigmas, sigmas[1:])})

    def snap(self, sigma):
        sigma = float(sigma)
        nearest = min(self.known, key=lambda s: abs(s - sigma))
        assert abs(nearest - sigma) < 1e-4 * sigma, (sigma, nearest)
        return nearest

    def __call__(self, sigma, sigma_next):
        return self.noise(self.snap(sigma), self.snap(sigma_next))


@torch.no_grad()
def run_diffusers(name, model, cond, uncond, x_T, steps, seed):
    scheduler = diffusers_scheduler(name, model)
    scheduler.set_timesteps(steps)
    recorder = RecordingModel(model)
    step_kwargs = {}
    if name == "euler_a":
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    if name.startswith("dpmpp_sde"):
        ours = sampling.get_sigmas(sampling.Denoiser(model, cond), steps, K_SAMPLERS[name].schedule)
        noise = sampling.BrownianNoise(x_T.shape, torch.Generator().manual_seed(seed))
        scheduler.noise_sampler = SnappedNoise(noise, ours[:-1].tolist())
    latents = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        t_batch = t.expand(2 * BATCH)
        out_uncond, out_cond = recorder.apply_model(torch.cat([x_in] * 2), t_batch,
                                                    cat_conditioning(uncond, cond)).chunk(2)
        eps = out_uncond + SCALE * (out_cond - out_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents, recorder.timesteps, scheduler


def run_ours(name, model, cond, uncond, x_T, steps, seed):
    recorder = RecordingModel(model)
    samples, _ = KSampler(recorder, name).sample(steps, BATCH, SHAPE, cond, verbose=False, x_T=x_T,
                                                 unconditional_guidance_scale=SCALE, unconditional_conditioning=uncond,
                                                 generator=torch.Generator().manual_seed(seed))
    return samples, recorder.timesteps


def unique_sigmas(name, scheduler):
    """diffusers' second-order schedulers repeat each inner sigma; the distinct ones, as ours."""
    sigmas = scheduler.sigmas.double()
    if name in ("heun", "dpmpp_sde", "dpmpp_sde_karras"):
        sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
    return sigmas


@pytest.mark.parametrize("steps", [4, 9])
@pytest.mark.parametrize("name", list(K_SAMPLERS))
def test_matches_diffusers_step_for_step(tiny_ldm, conditioning, name, steps):
    if name.startswith("dpmpp_sde"):
        pytest.importorskip("torchsde")  # diffusers' DPMSolverSDEScheduler module imports it
    cond, uncond = conditioning
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(11))
    theirs, their_t, scheduler = run_diffusers(name, tiny_ldm, cond, uncond, x_T, steps, seed=5)
    ours, our_t = run_ours(name, tiny_ldm, cond, uncond, x_T, steps, seed=5)

    sigmas = sampling.get_sigmas(sampling.Denoiser(tiny_ldm, cond), steps, K_SAMPLERS[name].schedule)
    assert torch.allclose(sigmas, unique_sigmas(name, scheduler), rtol=1e-4, atol=0)
    assert len(our_t) == len(their_t) == {"heun": 2 * steps - 1, "dpmpp_sde": 2 * steps - 1,
                                          "dpmpp_sde_karras": 2 * steps - 1}.get(name, steps)
    assert np.allclose(our_t, their_t, atol=1e-3), (our_t, their_t)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    # The random tiny UNet with guidance 5 ends far from unit scale (|x| ~ 50): compare relative to it.
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_sampler_names():
    assert SAMPLERS[:2] == ("ddim", "plms")
    assert {"euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde", "unipc"} <= set(SAMPLERS)
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'"):
        make_sampler(None, "dpm++")
