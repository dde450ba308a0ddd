"""DDIM and PLMS samplers.

Most tests drive the samplers with the exact denoiser of Gaussian data N(m, s^2): its ideal samples
are known in closed form, so the tests check the sampling math itself, not just that it runs. The
rest run the tiny LatentDiffusion of the test configs.
"""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.prediction import Prediction
from ldm.models.diffusion.conditioning import cat_conditioning, guided_output
from ldm.models.diffusion.generate import make_sampler
from ldm.modules.diffusionmodules.util import make_beta_schedule

SIGMA = 0.5
SHAPE = (1, 8, 8)
BATCH = 64


class GaussianDenoiser(torch.nn.Module):
    """The optimal denoiser for data x0 ~ N(m, SIGMA^2 I), where the conditioning gives m per sample.

    With x_t = sqrt(a) x0 + sqrt(1 - a) eps, E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a SIGMA^2 + 1 - a).
    Guidance with scale w between m and an unconditional m = 0 is exactly the score of N(w m, SIGMA^2).
    """

    def __init__(self, parameterization="eps"):
        super().__init__()
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        alphas_cumprod = np.cumprod(1. - betas)
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32))
        self.register_buffer("alphas_cumprod", torch.tensor(alphas_cumprod, dtype=torch.float32))
        self.register_buffer("alphas_cumprod_prev", torch.tensor(np.append(1., alphas_cumprod[:-1]),
                                                                 dtype=torch.float32))
        self.num_timesteps = 1000
        self.parameterization = parameterization
        self.prediction = Prediction(parameterization)
        self.batch_sizes = []

    def q_sample(self, x_start, t, noise):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x_start + (1 - a).sqrt() * noise

    def apply_model(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).double()
        m, x = cond.view(-1, 1, 1, 1).double(), x.double()
        d = a * SIGMA ** 2 + 1 - a
        eps = (1 - a).sqrt() * (x - a.sqrt() * m) / d
        x0 = m + a.sqrt() * SIGMA ** 2 * (x - a.sqrt() * m) / d
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.parameterization]
        return out.to(torch.float32)


def draw(sampler_cls, steps=20, seed=0, cond=1.0, parameterization="eps", **kwargs):
    model = GaussianDenoiser(parameterization)
    sampler = sampler_cls(model)
    samples, intermediates = sampler.sample(steps, BATCH, SHAPE, conditioning=torch.full((BATCH,), cond),
                                            verbose=False, generator=torch.Generator().manual_seed(seed), **kwargs)
    return samples, intermediates, model


@pytest.mark.parametrize("sampler_cls,steps,tol", [(DDIMSampler, 50, 0.05), (PLMSSampler, 20, 0.03)])
def test_sampler_draws_the_data_distribution(sampler_cls, steps, tol):
    samples, _, _ = draw(sampler_cls, steps=steps)
    assert samples.shape == (BATCH, *SHAPE) and samples.dtype == torch.float32
    assert abs(samples.std().item() - SIGMA) < tol
    assert abs(samples.mean().item() - 1.0) < 0.08


def test_plms_is_more_accurate_than_ddim_at_equal_steps():
    ddim, _, _ = draw(DDIMSampler, steps=10)
    plms, _, _ = draw(PLMSSampler, steps=10)
    assert abs(plms.std().item() - SIGMA) < abs(ddim.std().item() - SIGMA) / 2


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_seed_reproducibility(sampler_cls):
    a, _, _ = draw(sampler_cls, steps=5, seed=1)
    b, _, _ = draw(sampler_cls, steps=5, seed=1)
    c, _, _ = draw(sampler_cls, steps=5, seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_global_seed_reproducibility_without_generator():
    model = GaussianDenoiser()
    cond = torch.ones(BATCH)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(DDIMSampler(model).sample(4, BATCH, SHAPE, cond, eta=1., verbose=False)[0])
    assert torch.equal(*runs)


@pytest.mark.parametrize("sampler_cls,calls", [(DDIMSampler, 8), (PLMSSampler, 9)])
def test_guidance_is_one_batched_call_and_extrapolates(sampler_cls, calls):
    samples, _, model = draw(sampler_cls, steps=8,
                             unconditional_conditioning=torch.zeros(BATCH), unconditional_guidance_scale=3.)
    # cond and uncond travel in one call of twice the batch; PLMS spends one extra call on its first step.
    assert model.batch_sizes == [2 * BATCH] * calls
    assert abs(samples.mean().item() - 3.0) < 0.3


def test_scale_one_skips_the_unconditional_branch():
    _, _, model = draw(DDIMSampler, steps=4, unconditional_conditioning=torch.zeros(BATCH),
                       unconditional_guidance_scale=1.)
    assert model.batch_sizes == [BATCH] * 4


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_x0_and_v_parameterisations_match_eps(sampler_cls, parameterization):
    """The same denoiser predicting x0 or v (SD 2.x 768-px) samples what its eps form samples."""
    eps, _, _ = draw(sampler_cls, steps=10)
    other, _, _ = draw(sampler_cls, steps=10, parameterization=parameterization)
    assert torch.allclose(eps, other, atol=1e-4)


def test_ddim_eta_is_stochastic_and_still_right():
    x_T = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))
    a, _, _ = draw(DDIMSampler, steps=50, seed=1, eta=1., x_T=x_T)
    b, _, _ = draw(DDIMSampler, steps=50, seed=2, eta=1., x_T=x_T)
    c, _, _ = draw(DDIMSampler, steps=50, seed=1, eta=0., x_T=x_T)
    d, _, _ = draw(DDIMSampler, steps=50, seed=2, eta=0., x_T=x_T)
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)
    assert abs(a.std().item() - SIGMA) < 0.07


def test_plms_refuses_eta():
    with pytest.raises(ValueError, match="eta"):
        draw(PLMSSampler, steps=3, eta=0.5)


def test_intermediates_and_callbacks():
    seen = []
    samples, inter, _ = draw(DDIMSampler, steps=5, log_every_t=2, callback=seen.append,
                             img_callback=lambda pred_x0, i: seen.append(tuple(pred_x0.shape)))
    # x_T, then the steps of index 4 (the first), 2 and 0
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 4
    assert torch.equal(inter["x_inter"][-1], samples)
    assert seen == [x for i in range(5) for x in (i, (BATCH, *SHAPE))]


def test_mask_keeps_the_known_region():
    x0 = torch.full((BATCH, *SHAPE), 2.0)
    mask = torch.zeros(BATCH, *SHAPE)
    mask[..., :4] = 1.
    samples, _, _ = draw(DDIMSampler, steps=20, mask=mask, x0=x0)
    # up to the noise of the last step (std sqrt(1 - alphas_cumprod[0]) ~ 0.03)
    assert (samples[..., :4] - x0[..., :4]).abs().mean() < 0.05
    assert abs(samples[..., 4:].mean().item() - 2.0) > 0.5


def test_stochastic_encode_then_decode_stays_in_distribution():
    model = GaussianDenoiser()
    sampler = DDIMSampler(model)
    sampler.make_schedule(20, verbose=False)
    sampler.generator = torch.Generator().manual_seed(0)
    x0 = 1.0 + SIGMA * torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(1))
    t_enc = 10
    z = sampler.stochastic_encode(x0, torch.full((BATCH,), t_enc - 1))
    assert abs(z.std().item() - 1.0) < 0.5  # half way to noise
    out = sampler.decode(z, torch.ones(BATCH), t_enc, verbose=False)
    assert model.batch_sizes == [BATCH] * t_enc
    assert abs(out.std().item() - SIGMA) < 0.08 and abs(out.mean().item() - 1.0) < 0.05


def test_cat_conditioning_handles_nested_inputs():
    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    out = cat_conditioning({"c_crossattn": [u]}, {"c_crossattn": [c]})
    assert torch.equal(out["c_crossattn"][0], torch.cat([u, c]))


@pytest.mark.parametrize("name", ["ddim", "plms", "euler", "dpmpp_2m"])
def test_every_sampler_refuses_a_conditioning_for_another_batch_size(name):
    sampler = make_sampler(GaussianDenoiser(), name)
    with pytest.raises(ValueError, match="got 2 conditionings for a batch of 3 samples"):
        sampler.sample(2, 3, SHAPE, torch.ones(2), verbose=False)
    with pytest.raises(ValueError, match="got 2 conditionings for a batch of 3 samples"):  # guided too
        sampler.sample(2, 3, SHAPE, torch.ones(2), verbose=False, unconditional_guidance_scale=3.0,
                       unconditional_conditioning=torch.zeros(2))


def test_guided_output_is_one_batched_call_of_the_guidance_formula():
    model = GaussianDenoiser()
    x, t = torch.randn(2, *SHAPE), torch.tensor([10, 500])
    cond, uncond = torch.ones(2), torch.zeros(2)
    out_cond, out_uncond = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    model.batch_sizes.clear()
    guided = guided_output(model, x, t, cond, uncond, scale=3.0)
    assert model.batch_sizes == [4] and guided.dtype == torch.float32
    assert torch.allclose(guided, out_uncond + 3.0 * (out_cond - out_uncond), atol=1e-6)
    assert torch.equal(guided_output(model, x, t, cond, uncond, scale=1.0), out_cond)  # scale 1: one branch


def test_schedule_follows_the_model_device_and_stays_float32():
    """Known defect of the original: make_schedule moved every tensor to torch.device("cuda"), so the
    samplers failed on CPU and MPS. The schedule must live wherever the model's buffers are."""
    model = GaussianDenoiser()
    sampler = DDIMSampler(model)
    sampler.make_schedule(5, verbose=False)
    for name in ("alphas_cumprod", "ddim_alphas", "ddim_alphas_prev", "ddim_sigmas",
                 "ddim_sqrt_one_minus_alphas", "ddim_sigmas_for_original_num_steps"):
        tensor = getattr(sampler, name)
        assert tensor.device == model.betas.device and tensor.dtype == torch.float32, name
    assert list(sampler.ddim_timesteps) == [1, 201, 401, 601, 801]


def test_half_precision_start_code_keeps_its_dtype():
    x_T = torch.randn(BATCH, *SHAPE).to(torch.bfloat16)
    samples, _, _ = draw(DDIMSampler, steps=5, x_T=x_T)
    assert samples.dtype == torch.bfloat16 and torch.isfinite(samples.float()).all()


@pytest.fixture(scope="module")
def tiny_ldm(tiny_config):
    from conftest import build_tiny_model
    return build_tiny_model(tiny_config)


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_tiny_ldm_guided_sampling_is_seeded(tiny_ldm, sampler_cls):
    c = tiny_ldm.get_learned_conditioning(["a photo of *", "a red circle"])
    uc = tiny_ldm.get_learned_conditioning(2 * [""])
    shape = (tiny_ldm.channels, tiny_ldm.image_size, tiny_ldm.image_size)

    def run(seed):
        return sampler_cls(tiny_ldm).sample(4, 2, shape, c, verbose=False, unconditional_guidance_scale=5.,
                                            unconditional_conditioning=uc,
                                            generator=torch.Generator().manual_seed(seed))[0]

    a, b, other = run(0), run(0), run(1)
    assert a.shape == (2, *shape) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, other)
    assert tiny_ldm.decode_first_stage(a).shape == (2, 3, 32, 32)


def test_tiny_ldm_samples_under_bfloat16_autocast(tiny_ldm):
    """The scripts' --precision autocast on CPU: the UNet runs in bfloat16, the DDIM update in float32."""
    c = tiny_ldm.get_learned_conditioning(["a photo of *"])
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = DDIMSampler(tiny_ldm).sample(4, 1, (4, 8, 8), c, verbose=False, x_T=x_T)
    full, _ = DDIMSampler(tiny_ldm).sample(4, 1, (4, 8, 8), c, verbose=False, x_T=x_T)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, full, atol=0.1) and not torch.equal(fast, full)


@pytest.mark.parametrize("steps", [3, 7])
def test_step_counts_that_do_not_divide_the_schedule(steps):
    samples, _, model = draw(PLMSSampler, steps=steps)
    assert len(model.batch_sizes) == steps + 1 and torch.isfinite(samples).all()


def test_a_misspelt_keyword_is_an_error_not_dropped_guidance():
    """The original's sample() took **kwargs, so `unconditional_guidance_scal=7.5` sampled without guidance."""
    with pytest.raises(TypeError, match="unconditional_guidance_scal"):
        draw(DDIMSampler, steps=2, unconditional_conditioning=torch.zeros(BATCH), unconditional_guidance_scal=3.)
