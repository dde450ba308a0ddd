"""Choosing a sampler by name, and the one path from prompts to images that the scripts, the evaluation and
`LatentDiffusion.log_images` share: prompt -> conditioning -> sampled latents -> decoded images."""
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ldm.models.diffusion import sampling
from ldm.models.diffusion.conditioning import check_batch_size
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddim_schedule_sampler import record_step
from ldm.models.diffusion.plms import PLMSSampler


@dataclass(frozen=True)
class KSpec:
    function: Callable
    schedule: str
    quantize: bool = False  # the model sees the nearest trained timestep
    noise: str = None  # fresh noise every step: "gaussian" (independent draws) or "brownian" (one Brownian path)
    # x_T is the DDPM sample at the first noise level (x = x_T * sqrt(sigma^2 + 1), as DDIM and diffusers'
    # multistep solvers start) rather than x_T * sigma (k-diffusion, diffusers' Euler/Heun/SDE)
    ddpm_start: bool = False

    @property
    def stochastic(self):
        return self.noise is not None


# Each as the diffusers scheduler it is tested against (see sampling.py), with that scheduler's default steps.
K_SAMPLERS = {
    "euler": KSpec(sampling.euler, "linspace"),
    "euler_a": KSpec(sampling.euler_ancestral, "linspace", noise="gaussian"),
    "heun": KSpec(sampling.heun, "linspace"),
    "dpmpp_2m": KSpec(sampling.dpmpp_2m, "discrete", quantize=True, ddpm_start=True),
    "dpmpp_2m_karras": KSpec(sampling.dpmpp_2m, "karras", quantize=True, ddpm_start=True),
    "dpmpp_sde": KSpec(sampling.dpmpp_sde, "linspace", noise="brownian"),
    "dpmpp_sde_karras": KSpec(sampling.dpmpp_sde, "karras", noise="brownian"),
    "unipc": KSpec(sampling.unipc, "discrete", quantize=True, ddpm_start=True),
}
SAMPLERS = ("ddim", "plms", *K_SAMPLERS)


class KSampler:
    """A sampler of K_SAMPLERS behind DDIMSampler's `sample` interface (the arguments they share)."""

    def __init__(self, model, name):
        if name not in K_SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
        self.model, self.name, self.spec = model, name, K_SAMPLERS[name]

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, verbose=True,
               x_T=None, log_every_t=100, unconditional_guidance_scale=1., unconditional_conditioning=None,
               generator=None):
        """Draw `batch_size` latents of `shape` in `S` steps; returns (samples, intermediates) as DDIMSampler
        (intermediates: the start, then x in sigma space and the x0 estimates every `log_every_t` steps).

        x_T is standard normal noise (as for DDIM): it is scaled to the first noise level here.
        """
        check_batch_size(conditioning, batch_size)
        device = self.model.betas.device
        denoiser = sampling.Denoiser(self.model, conditioning, unconditional_conditioning,
                                     unconditional_guidance_scale, quantize=self.spec.quantize)
        sigmas = sampling.get_sigmas(denoiser, S, self.spec.schedule)
        size = (batch_size, *shape)
        start = sampling.gaussian(size, generator, device) if x_T is None else x_T.to(device)
        sigma_max = sigmas[0].item()
        x = start.float() * (math.sqrt(sigma_max ** 2 + 1) if self.spec.ddpm_start else sigma_max)
        intermediates = {"x_inter": [start], "pred_x0": [start]}

        def report(i, x, denoised):
            record_step(intermediates, i, x, denoised, i % log_every_t == 0 or i == S - 1, callback, img_callback)

        args = [denoiser, x, sigmas]
        if self.spec.noise == "brownian":
            args.append(sampling.BrownianNoise(size, generator, device))
        elif self.spec.noise == "gaussian":
            args.append(lambda sigma, sigma_next: sampling.gaussian(size, generator, device))
        if verbose:
            print(f"Sampling {size} with {self.name}: {S} steps, sigmas {sigmas[0].item():.3g} -> 0")
        samples = self.spec.function(*args, callback=report)
        return samples.to(start.dtype), intermediates


def make_sampler(model, name="ddim"):
    """A sampler for `model` by name: ddim, plms or one of K_SAMPLERS."""
    if name == "ddim":
        return DDIMSampler(model)
    if name == "plms":
        return PLMSSampler(model)
    return KSampler(model, name)


@torch.no_grad()
def generate(model, prompts, sampler="ddim", steps=50, scale=1.0, eta=0.0, generator=None, shape=None, x_T=None,
             negative_prompt=""):
    """Images of `prompts` ((n, 3, H, W) in [-1, 1], on the model's device) from a LatentDiffusion.

    Classifier-free guidance when scale != 1, against `negative_prompt` (the empty prompt by default); `eta` is DDIM's (the other samplers
    have their own, fixed noise); `shape` (C, H, W) of the latents defaults to the model's. An unconditional
    model only counts the prompts. Run it under `model.ema_scope()` to sample the EMA weights.
    """
    conditional = model.model.conditioning_key is not None
    shape = shape or (model.channels, model.image_size, model.image_size)
    cond, uncond = (model.sampling_conditioning(prompts, scale != 1.0, shape, len(prompts) * [negative_prompt])
                    if conditional else (None, None))
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    latents, _ = make_sampler(model, sampler).sample(
        steps, len(prompts), shape, cond, verbose=False, unconditional_guidance_scale=scale,
        unconditional_conditioning=uncond, generator=generator, x_T=x_T, **kwargs)
    return model.decode_first_stage(latents).float().clamp(-1.0, 1.0)
