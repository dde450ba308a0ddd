"""DDIM sampling (Song et al. 2020, "Denoising Diffusion Implicit Models"), plus its img2img encode/decode."""
import numpy as np
import torch

from ldm.models.diffusion.ddim_schedule_sampler import DDIMScheduleSampler
from ldm.modules.diffusionmodules.util import extract_into_tensor


class DDIMSampler(DDIMScheduleSampler):
    desc = "DDIM Sampler"

    def stepper(self, conditioning, step_kwargs):
        return lambda x, t, t_next, index: self.p_sample_ddim(x, conditioning, t, index, **step_kwargs)

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1., unconditional_conditioning=None):
        e_t = self.model_eps(x, t, c, unconditional_guidance_scale, unconditional_conditioning,
                             score_corrector, corrector_kwargs)
        return self.ddim_step(x, e_t, index, use_original_steps, quantize_denoised, temperature, noise_dropout,
                              repeat_noise)

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        """Noise x0 to step index `t` of the DDIM schedule (or DDPM timestep `t` with use_original_steps)."""
        if use_original_steps:
            sqrt_alphas, sqrt_one_minus_alphas = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_alphas, sqrt_one_minus_alphas = self.ddim_alphas.sqrt(), self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = self.randn(x0.shape)
        t = t.to(self.device)
        return (extract_into_tensor(sqrt_alphas, t, x0.shape) * x0
                + extract_into_tensor(sqrt_one_minus_alphas, t, x0.shape) * noise)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, verbose=True):
        """Denoise a latent produced by `stochastic_encode(..., t_start - 1)` back to step 0."""
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        step = lambda x, t, t_next, index: self.p_sample_ddim(
            x, cond, t, index, use_original_steps=use_original_steps,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning)
        x_dec, _ = self.sampling_loop(step, x_latent, timesteps[:t_start], verbose=verbose, desc="Decoding image")
        return x_dec
