"""DDIM sampling (Song et al. 2020, "Denoising Diffusion Implicit Models"), plus its img2img encode/decode."""
import numpy as np
import torch

from ldm.models.diffusion.sampling_util import DDIMScheduleSampler
from ldm.modules.diffusionmodules.util import extract_into_tensor


class DDIMSampler(DDIMScheduleSampler):
    desc = "DDIM Sampler"

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, generator=None, **kwargs):
        """Draw `batch_size` latents of `shape` (C, H, W) in `S` steps; returns (samples, intermediates)."""
        x = self.start(S, batch_size, shape, conditioning, eta, verbose, x_T, generator)
        step_kwargs = dict(quantize_denoised=quantize_x0, temperature=temperature, noise_dropout=noise_dropout,
                           score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                           unconditional_guidance_scale=unconditional_guidance_scale,
                           unconditional_conditioning=unconditional_conditioning)
        step = lambda x, t, t_next, index: self.p_sample_ddim(x, conditioning, t, index, **step_kwargs)
        return self.sampling_loop(step, x, self.ddim_timesteps, mask=mask, x0=x0, callback=callback,
                                  img_callback=img_callback, log_every_t=log_every_t, verbose=verbose)

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
