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
from ldm.models.diffusion.prediction import Prediction  # noqa: E402
from ldm.models.diffusion.generate import K_SAMPLERS, SAMPLERS, KSampler, generate, make_sampler  # noqa: E402
from ldm.models.diffusion.conditioning import cat_conditioning  # noqa: E402

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


# ------------------------------------------------------------------ the sampling math on exactly known data
DATA_STD, DATA_MEAN = 0.5, 1.0


def gaussian_denoiser(x, sigma):
    """The exact denoiser of data N(DATA_MEAN, DATA_STD^2): E[x0 | x0 + sigma * eps = x]."""
    return DATA_MEAN + DATA_STD ** 2 / (DATA_STD ** 2 + sigma ** 2) * (x - DATA_MEAN)


def karras_sigmas(n, sigma_min=0.03, sigma_max=14.6):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def ode_error(function, n):
    """Largest error against the exact probability-flow ODE endpoint, which for Gaussian data is affine in x_T."""
    sigmas = karras_sigmas(n)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64) * sigmas[0].item()
    # x(sigma) - mean scales with sqrt(DATA_STD^2 + sigma^2) along the ODE; every sampler's last step jumps
    # from sigma_min to D(x, sigma_min)
    sigma_max, sigma_min = sigmas[0].item(), sigmas[-2].item()
    at_min = DATA_MEAN + (x - DATA_MEAN) * math.hypot(DATA_STD, sigma_min) / math.hypot(DATA_STD, sigma_max)
    exact = gaussian_denoiser(at_min, sigma_min)
    return (function(gaussian_denoiser, x, sigmas) - exact).abs().max().item()


@pytest.mark.parametrize("function,order", [(sampling.euler, 1), (sampling.heun, 2), (sampling.dpmpp_2m, 2),
                                            (sampling.unipc, 3)])
def test_deterministic_samplers_converge_at_their_order(function, order):
    coarse, fine = ode_error(function, 20), ode_error(function, 40)
    # halving the step size divides the error by about 2^order (UniPC-2 with its corrector: order 3)
    assert coarse / fine > 2 ** order * 0.7, (coarse, fine)
    assert fine < {1: 0.1, 2: 0.01, 3: 0.002}[order]


def test_unipc_and_dpmpp_2m_beat_euler_at_equal_model_calls():
    assert ode_error(sampling.dpmpp_2m, 20) < ode_error(sampling.euler, 20) / 4
    assert ode_error(sampling.unipc, 20) < ode_error(sampling.dpmpp_2m, 20)


# Euler ancestral is first order and converges slowly (std 0.42 at 20 steps, 0.48 at 100)
@pytest.mark.parametrize("name,steps", [("euler_a", 400), ("dpmpp_sde", 20)])
def test_stochastic_samplers_draw_the_data_distribution(name, steps):
    spec = K_SAMPLERS[name]
    sigmas = karras_sigmas(steps)
    shape = (4096,)
    generator = torch.Generator().manual_seed(0)
    x = sampling.gaussian(shape, generator, "cpu").double() * sigmas[0].item()
    noise = (sampling.BrownianNoise(shape, generator) if spec.noise == "brownian"
             else lambda s, s_next: sampling.gaussian(shape, generator, "cpu"))
    out = spec.function(gaussian_denoiser, x, sigmas, noise)
    assert abs(out.mean().item() - DATA_MEAN) < 0.05 and abs(out.std().item() - DATA_STD) < 0.03


def test_brownian_noise_is_one_consistent_brownian_path():
    shape = (20000,)
    noise = sampling.BrownianNoise(shape, torch.Generator().manual_seed(0))
    whole, first_half, later = noise(4.0, 1.0), noise(4.0, 2.5), noise(1.0, 0.25)
    for n in (whole, first_half, later):
        assert abs(n.mean().item()) < 0.03 and abs(n.std().item() - 1) < 0.03
    # W(1) - W(4) contains W(2.5) - W(4): correlation sqrt(1.5 / 3); disjoint intervals are independent
    assert abs(torch.corrcoef(torch.stack([whole, first_half]))[0, 1].item() - math.sqrt(0.5)) < 0.03
    assert abs(torch.corrcoef(torch.stack([whole, later]))[0, 1].item()) < 0.03
    assert torch.equal(noise(4.0, 2.5), first_half)  # asked again: the same increment
    again = sampling.BrownianNoise(shape, torch.Generator().manual_seed(0))
    assert torch.equal(again(4.0, 1.0), whole)


def test_schedules():
    class Model:
        alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
        parameterization = "eps"

        def parameters(self):
            return iter(())

    denoiser = sampling.Denoiser(Model(), None)
    for schedule in ("linspace", "discrete", "karras"):
        sigmas = sampling.get_sigmas(denoiser, 6, schedule)
        assert sigmas.dtype == torch.float64 and sigmas.device.type == "cpu"
        assert len(sigmas) == 7 and sigmas[-1] == 0 and (sigmas[:-1].diff() < 0).all()
    linspace = sampling.get_sigmas(denoiser, 6, "linspace")
    assert math.isclose(linspace[0].item(), denoiser.sigma_max) and math.isclose(linspace[-2].item(),
                                                                                denoiser.sigma_min)
    assert [denoiser.sigma_to_t(s) for s in linspace[:-1].tolist()] == pytest.approx([999, 799.2, 599.4, 399.6,
                                                                                      199.8, 0], abs=1e-6)
    denoiser.quantize = True
    assert [denoiser.sigma_to_t(s) for s in sampling.get_sigmas(denoiser, 4, "discrete")[:-1].tolist()] == \
        [999, 749, 500, 250]
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        sampling.get_sigmas(denoiser, 4, "cosine")
    with pytest.raises(ValueError, match="at least 1"):
        sampling.get_sigmas(denoiser, 0)


# ------------------------------------------------------------------ on the tiny LatentDiffusion
class Reparameterized:
    """The tiny model's eps prediction re-expressed as x0 or v, at integer timesteps."""

    def __init__(self, model, parameterization):
        self.model, self.parameterization = model, parameterization
        self.prediction = Prediction(parameterization)  # what every sampler reads

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply_model(self, x, t, cond):
        eps = self.model.apply_model(x, t, cond)
        a = self.model.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return x0 if self.parameterization == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_x0_and_v_models_sample_as_the_eps_model(tiny_ldm, conditioning, parameterization):
    cond, uncond = conditioning
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(3))
    run = lambda model: KSampler(model, "dpmpp_2m").sample(5, BATCH, SHAPE, cond, verbose=False, x_T=x_T,
                                                           unconditional_guidance_scale=SCALE,
                                                           unconditional_conditioning=uncond)[0]
    eps, other = run(tiny_ldm), run(Reparameterized(tiny_ldm, parameterization))
    assert (eps - other).abs().max() < 1e-4 * eps.abs().max()
    with pytest.raises(ValueError, match="parameterization must be one of 'eps', 'x0', 'v', got 'score'"):
        Reparameterized(tiny_ldm, "score")


@torch.no_grad()
def test_v_model_matches_diffusers_v_prediction(tiny_ldm, conditioning):
    cond, uncond = conditioning
    model = Reparameterized(tiny_ldm, "v")
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(4))
    scheduler = diffusers.DPMSolverMultistepScheduler(trained_betas=tiny_ldm.betas.numpy(),
                                                      prediction_type="v_prediction")
    scheduler.set_timesteps(5)
    latents = x_T.clone()
    for t in scheduler.timesteps:
        out_uncond, out_cond = model.apply_model(torch.cat([latents] * 2), t.expand(2 * BATCH),
                                                 cat_conditioning(uncond, cond)).chunk(2)
        latents = scheduler.step(out_uncond + SCALE * (out_cond - out_uncond), t, latents).prev_sample
    ours = KSampler(model, "dpmpp_2m").sample(5, BATCH, SHAPE, cond, verbose=False, x_T=x_T,
                                              unconditional_guidance_scale=SCALE,
                                              unconditional_conditioning=uncond)[0]
    assert (ours - latents).abs().max() < 1e-5 * latents.abs().max()


@pytest.mark.parametrize("name", list(K_SAMPLERS))
def test_seeded_and_guidance_in_one_batched_call(tiny_ldm, conditioning, name):
    cond, uncond = conditioning
    recorder = RecordingModel(tiny_ldm)
    batch_sizes = []
    recorder.apply_model = lambda x, t, c: batch_sizes.append(x.shape[0]) or tiny_ldm.apply_model(x, t, c)
    run = lambda seed, x_T=None: KSampler(recorder, name).sample(
        3, BATCH, SHAPE, cond, verbose=False, x_T=x_T, unconditional_guidance_scale=SCALE,
        unconditional_conditioning=uncond, generator=torch.Generator().manual_seed(seed))[0]
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert set(batch_sizes) == {2 * BATCH}
    x_T = torch.randn(BATCH, *SHAPE)
    same_start = [run(seed, x_T) for seed in (0, 1)]
    # from one start, only the samplers that add noise on the way depend on the seed
    assert torch.equal(*same_start) != K_SAMPLERS[name].stochastic


def test_generate_and_log_images_use_the_chosen_sampler(tiny_ldm):
    generator = torch.Generator().manual_seed(0)
    images = generate(tiny_ldm, ["a red circle", "a photo of *"], "dpmpp_2m_karras", 4, 3.0, generator=generator)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    torch.manual_seed(0)
    logged = tiny_ldm.log_images(batch, N=2, ddim_steps=3, sampler="euler_a")
    assert {"samples", "samples_scaled", "samples_placeholder"} <= set(logged)
    assert all(logged[k].shape == (2, 3, 32, 32) for k in ("samples", "samples_scaled", "samples_placeholder"))
    torch.manual_seed(0)
    assert torch.equal(tiny_ldm.log_images(batch, N=2, ddim_steps=3, sampler="euler_a")["samples"],
                       logged["samples"])
    with pytest.raises(ValueError, match="unknown sampler 'ddpm'"):
        tiny_ldm.log_images(batch, N=2, ddim_steps=3, sampler="ddpm")
