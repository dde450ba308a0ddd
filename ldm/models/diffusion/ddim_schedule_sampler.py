"""DDIMScheduleSampler, the base class of DDIMSampler and PLMSSampler: the sub-sampled schedule, the guided noise
estimate and the DDIM update they share.

Both samplers walk the same sub-sequence of the model's timesteps and differ only in which noise
estimate they feed the DDIM update (Song et al. 2020, eq. 12): DDIM the current one, PLMS a
linear multistep combination of the last few (Liu et al. 2022).
"""
import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.conditioning import check_batch_size, guided_output
from ldm.modules.diffusionmodules.util import (extract_into_tensor, make_ddim_sampling_parameters,
                                               make_ddim_timesteps, noise_like)
from ldm.util import model_dtype


def record_step(intermediates, i, x, pred_x0, keep, callback=None, img_callback=None):
    """Every sampler's progress hooks after step i: callback(i), img_callback(x0 estimate, i), and, where `keep`,
    x and the x0 estimate appended to `intermediates`."""
    if callback:
        callback(i)
    if img_callback:
        img_callback(pred_x0, i)
    if keep:
        intermediates["x_inter"].append(x)
        intermediates["pred_x0"].append(pred_x0)


class DDIMScheduleSampler:
    """Base of DDIMSampler and PLMSSampler. Schedule tensors live on the model's device in float32.

    The original moved every schedule tensor to torch.device("cuda"), so nothing sampled on CPU or
    MPS; here they follow the model (`model.betas.device`).
    """

    desc = "Sampler"

    def __init__(self, model):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.generator = None

    @property
    def device(self):
        return self.model.betas.device

    def register_buffer(self, name, attr):
        if isinstance(attr, (torch.Tensor, np.ndarray)):
            attr = torch.as_tensor(attr).to(device=self.device, dtype=torch.float32)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        # Derive in float64 on the CPU (MPS has no float64), then store float32 on the model's device.
        alphas_cumprod = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas_cumprod must have one entry per DDPM timestep")
        alphas_cumprod_prev = self.model.alphas_cumprod_prev.detach().to("cpu", torch.float64)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1. - alphas_cumprod).sqrt())

        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphacums=alphas_cumprod.numpy(), ddim_timesteps=self.ddim_timesteps, eta=ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", sigmas)
        self.register_buffer("ddim_alphas", alphas)
        self.register_buffer("ddim_alphas_prev", alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", np.sqrt(1. - alphas))
        self.register_buffer("ddim_sigmas_for_original_num_steps", ddim_eta * torch.sqrt(
            (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * (1 - alphas_cumprod / alphas_cumprod_prev)))

    def randn(self, shape, repeat=False):
        """Gaussian noise on the model's device, drawn from `self.generator` when one is set.

        A CPU generator gives the same noise whatever device samples, so seeds carry across machines.
        """
        device = self.generator.device if self.generator is not None else self.device
        return noise_like(shape, device, repeat, generator=self.generator).to(self.device)

    def model_eps(self, x, t, c, unconditional_guidance_scale=1., unconditional_conditioning=None,
                  score_corrector=None, corrector_kwargs=None):
        """The model's (guided, float32) noise estimate at (x, t); x0 and v outputs are converted to eps."""
        out = guided_output(self.model, x, t, c, unconditional_conditioning, unconditional_guidance_scale)
        if self.model.prediction.kind != "eps":  # x0 and v outputs: DDIM/PLMS step with the noise they imply
            a_t = extract_into_tensor(self.alphas_cumprod, t, x.shape)
            out = self.model.prediction.to_eps(x.float(), out, a_t)
        if score_corrector is not None:
            out = score_corrector.modify_score(self.model, out, x, t, c, **(corrector_kwargs or {}))
        return out

    def ddim_step(self, x, e_t, index, use_original_steps=False, quantize_denoised=False, temperature=1.,
                  noise_dropout=0., repeat_noise=False):
        """One DDIM update from step `index` to the previous one; returns (x_prev, pred_x0) in x's dtype."""
        if use_original_steps:
            alphas, alphas_prev = self.alphas_cumprod, self.alphas_cumprod_prev
            sqrt_one_minus_alphas, sigmas = self.sqrt_one_minus_alphas_cumprod, self.ddim_sigmas_for_original_num_steps
        else:
            alphas, alphas_prev = self.ddim_alphas, self.ddim_alphas_prev
            sqrt_one_minus_alphas, sigmas = self.ddim_sqrt_one_minus_alphas, self.ddim_sigmas
        a_t, a_prev, sigma_t = alphas[index], alphas_prev[index], sigmas[index]
        # The update runs in float32 even when the model runs in half precision.
        x32, e_t = x.float(), e_t.float()
        pred_x0 = (x32 - sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        if quantize_denoised:
            pred_x0, _, *_ = self.model.first_stage_model.quantize(pred_x0)
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        # Drawn even when sigma_t is 0, so a seed consumes the random stream as the original does.
        noise = sigma_t * self.randn(x.shape, repeat_noise) * temperature
        if noise_dropout > 0.:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev.to(x.dtype), pred_x0.to(x.dtype)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, quantize_x0=False,
               eta=0., mask=None, x0=None, temperature=1., noise_dropout=0., score_corrector=None,
               corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100, unconditional_guidance_scale=1.,
               unconditional_conditioning=None, generator=None):
        """Draw `batch_size` latents of `shape` (C, H, W) in `S` steps; returns (samples, intermediates).

        The original's signature less what it ignored (`normals_sequence`, `**kwargs`: a misspelt keyword is
        an error, not silently dropped guidance); the sampler subclass supplies the per-step update through
        `stepper`.
        """
        check_batch_size(conditioning, batch_size)
        self.generator = generator
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            print(f"Data shape for {self.desc} sampling is {size}, eta {eta}")
        x = self.randn(size).to(model_dtype(self.model)) if x_T is None else x_T.to(self.device)
        step = self.stepper(conditioning, dict(
            quantize_denoised=quantize_x0, temperature=temperature, noise_dropout=noise_dropout,
            score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning))
        return self.sampling_loop(step, x, self.ddim_timesteps, mask=mask, x0=x0, callback=callback,
                                  img_callback=img_callback, log_every_t=log_every_t, verbose=verbose)

    def stepper(self, conditioning, step_kwargs):
        """-> step(x, t, t_next, index) -> (x_prev, pred_x0) for one `sample` call."""
        raise NotImplementedError

    def sampling_loop(self, step, x, timesteps, mask=None, x0=None, callback=None, img_callback=None,
                      log_every_t=100, verbose=True, desc=None):
        """Walk `timesteps` from last to first; `step(x, t, t_next, index)` returns (x_prev, pred_x0).

        With `mask` and `x0`, the region where mask == 1 is kept on x0's forward-noised trajectory
        (inpainting / outpainting).
        """
        time_range = np.flip(timesteps)
        total = len(time_range)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        full = lambda step_t: torch.full((x.shape[0],), int(step_t), device=self.device, dtype=torch.long)
        for i, step_t in enumerate(tqdm(time_range, desc=desc or self.desc, total=total, disable=not verbose)):
            index = total - i - 1
            t, t_next = full(step_t), full(time_range[min(i + 1, total - 1)])
            if mask is not None:
                if x0 is None:
                    raise ValueError("A mask needs the known image x0.")
                x = self.model.q_sample(x0, t, noise=self.randn(x0.shape)) * mask + (1. - mask) * x
            x, pred_x0 = step(x, t, t_next, index)
            record_step(intermediates, i, x, pred_x0, index % log_every_t == 0 or index == total - 1, callback,
                        img_callback)
        return x, intermediates
