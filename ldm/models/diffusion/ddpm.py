"""Denoising diffusion in pixel space (DDPM) and in an autoencoder's latent space (LatentDiffusion).

LatentDiffusion also carries textual inversion (`textual_inversion.TextualInversion`, mixed in): with a
`personalization_config` it builds an EmbeddingManager, freezes the UNet and the text encoder, and trains only
the manager's vectors.
"""
from contextlib import nullcontext
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from tqdm import tqdm

from ldm.checkpoint import load_weights
from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion.generate import generate
from ldm.models.diffusion.prediction import Prediction
from ldm.models.diffusion.conditioning import conditioner_batch, slice_conditioning, to_model_conditioning
from ldm.models.diffusion.textual_inversion import TextualInversion
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, noise_like
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.base import TextEncoder
from ldm.modules.ema import LitEma
from ldm.util import count_params, default, exists, freeze, instantiate_from_config, log_txt_as_img, parameters_on_meta

V_PREDICTION = Prediction("v")


class DDPM(pl.LightningModule):
    """Gaussian diffusion with a UNet denoiser, trained on the simple (and optionally VLB) objective."""

    def __init__(self, unet_config, timesteps=1000, beta_schedule="linear", loss_type="l2", ckpt_path=None,
                 ignore_keys=(), load_only_unet=False, monitor="val/loss", use_ema=True, first_stage_key="image",
                 image_size=256, channels=3, log_every_t=100, clip_denoised=True, linear_start=1e-4,
                 linear_end=2e-2, cosine_s=8e-3, given_betas=None, original_elbo_weight=0., v_posterior=0.,
                 l_simple_weight=1., conditioning_key=None, parameterization="eps", scheduler_config=None,
                 learn_logvar=False, logvar_init=0., min_timestep=0,
                 max_timestep=None, full_range_fraction=0.0):
        super().__init__()
        self.prediction = Prediction(parameterization)
        self.parameterization = parameterization
        print(f"{self.__class__.__name__}: Running in {self.parameterization}-prediction mode")
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
            print(f"Keeping EMAs of {len(list(self.model_ema.buffers()))}.")
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        # Training draws t uniformly from [min_timestep, max_timestep) (not in the original; as in kohya's
        # sd-scripts). Layout is decided at high noise: a concept's size and place are learned there.
        self.min_timestep = min_timestep
        self.max_timestep = self.num_timesteps if max_timestep is None else max_timestep
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_timesteps:
            raise ValueError(f"need 0 <= min_timestep < max_timestep <= timesteps ({self.num_timesteps}), got "
                             f"min_timestep={min_timestep}, max_timestep={max_timestep}")
        # A fraction of each batch drawn from the whole schedule instead: the low-noise steps, where a small
        # shape's outline is drawn, still teach the word something (docs/method.md).
        if not 0.0 <= full_range_fraction <= 1.0:
            raise ValueError(f"full_range_fraction must be in [0, 1], got {full_range_fraction}")
        self.full_range_fraction = full_range_fraction
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), logvar_init)
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        self._generators, self._pending_generator_state = {}, {}
        self.learning_rate = 1.0e-4  # main.py sets it from the config's base_learning_rate
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ----------------------------------------------------------------- schedule
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        alphas = 1. - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        assert alphas_cumprod.shape[0] == self.num_timesteps, "alphas have to be defined for each timestep"

        to_torch = partial(torch.tensor, dtype=torch.float32)
        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        # q(x_t | x_0)
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1. - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1. - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1. / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1. / alphas_cumprod - 1)))
        # q(x_{t-1} | x_t, x_0)
        posterior_variance = ((1 - self.v_posterior) * betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
                              + self.v_posterior * betas)
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        # the variance is 0 at the start of the chain, so clip the log
        self.register_buffer("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer("posterior_mean_coef1",
                             to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             to_torch((1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod)))
        lvlb_weights = self.prediction.vlb_weights(self.betas, to_torch(alphas), self.alphas_cumprod,
                                                   self.posterior_variance)
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)
        assert not torch.isnan(self.lvlb_weights).any()

    def ema_scope(self, context=None):
        """Temporarily swap in the EMA weights (a no-op without EMA)."""
        return self.model_ema.swapped_in(self.model, context) if self.use_ema else nullcontext()

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        optional = () if only_model else self.optional_weight_keys()
        load_weights(self.model if only_model else self, path, ignore_keys, optional=optional)

    def optional_weight_keys(self):
        """Keys a weights file may lack: none (the official SD v1/v2 checkpoints hold the schedule too)."""
        return ()

    # ------------------------------------------------------------ diffusion math
    def q_mean_variance(self, x_start, t):
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t, t, noise):
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    # Stability's SD 2.x names for the v conversions
    def predict_start_from_z_and_v(self, x_t, t, v):
        return V_PREDICTION.to_x0(x_t, v, self.alpha_bar(t, x_t))

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return V_PREDICTION.to_eps(x_t, v, self.alpha_bar(t, x_t))

    def get_v(self, x, noise, t):
        return V_PREDICTION.target(x, noise, self.alpha_bar(t, x))

    def alpha_bar(self, t, x):
        """alphas_cumprod at each sample's timestep, shaped to broadcast over `x`."""
        return extract_into_tensor(self.alphas_cumprod, t, x.shape)

    def q_posterior(self, x_start, x_t, t):
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def p_mean_variance(self, x, t, clip_denoised, cond=None):
        model_out = self.apply_model(x, t, cond)
        if self.parameterization == "eps":  # the original's precomputed coefficients, bit for bit
            x_recon = self.predict_start_from_noise(x, t, model_out)
        else:
            x_recon = self.prediction.to_x0(x, model_out, self.alpha_bar(t, x))
        if clip_denoised:
            x_recon.clamp_(-1., 1.)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised=True, repeat_noise=False, cond=None):
        b = x.shape[0]
        mean, _, log_variance = self.p_mean_variance(x, t, clip_denoised, cond=cond)
        noise = noise_like(x.shape, x.device, repeat_noise)
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (len(x.shape) - 1)))  # no noise at t == 0
        return mean + nonzero_mask * (0.5 * log_variance).exp() * noise

    @torch.no_grad()
    def p_sample_loop(self, shape, cond=None, return_intermediates=False, verbose=True, x_T=None):
        img = x_T if x_T is not None else torch.randn(shape, device=self.betas.device)
        intermediates = [img]
        for i in tqdm(reversed(range(self.num_timesteps)), desc="Sampling t", total=self.num_timesteps,
                      disable=not verbose):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            img = self.p_sample(img, t, clip_denoised=self.clip_denoised, cond=cond)
            if i % self.log_every_t == 0 or i == 0:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size=16, return_intermediates=False):
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates)

    def apply_model(self, x_noisy, t, cond=None):
        return self.model(x_noisy, t)

    # ------------------------------------------------------------------ training
    def noise_generator(self):
        """The generator behind every random draw of a step (timesteps, noise, latent samples).

        Training draws from its own generator, saved in the checkpoint, so that a resumed run draws exactly
        what an uninterrupted one would; validation draws from one reseeded each epoch, so that it neither
        disturbs training nor varies between runs.
        """
        split = "train" if self.training else "val"
        g = self._generators.get(split)
        if g is None or g.device != self.device:
            g = torch.Generator(device=self.device)
            state = self._pending_generator_state.pop(split, None)
            if state is not None and state[0] == self.device.type:
                g.set_state(state[1])
            else:
                g.manual_seed(torch.initial_seed() + 7919 * self.global_rank + (split == "val"))
            self._generators[split] = g
        return g

    def randn(self, shape, like):
        return torch.randn(shape, generator=self.noise_generator(), device=like.device).to(like.dtype)

    def get_loss(self, pred, target, mean=True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
        elif self.loss_type == "l2":
            loss = torch.nn.functional.mse_loss(target, pred, reduction="none")
        else:
            raise NotImplementedError(f"unknown loss type '{self.loss_type}'")
        return loss.mean() if mean else loss

    def p_losses(self, x_start, t, cond=None, noise=None):
        noise = default(noise, lambda: self.randn(x_start.shape, x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.prediction.target(x_start, noise, self.alpha_bar(t, x_start))
        prefix = "train" if self.training else "val"

        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        logvar_t = self.logvar[t]
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        if self.original_elbo_weight > 0:
            loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
            loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
            loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def sample_timesteps(self, n, device):
        generator = self.noise_generator()
        t = torch.randint(self.min_timestep, self.max_timestep, (n,), generator=generator, device=device)
        if self.full_range_fraction:
            whole = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
            pick = torch.rand((n,), generator=generator, device=device) < self.full_range_fraction
            t = torch.where(pick, whole, t)
        return t

    def forward(self, x, *args, **kwargs):
        return self.p_losses(x, self.sample_timesteps(x.shape[0], x.device), *args, **kwargs)

    def get_input(self, batch, k):
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        # datasets yield HWC images; the networks want CHW
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch):
        return self(self.get_input(batch, self.first_stage_key))

    def training_step(self, batch, batch_idx):
        loss, loss_dict = self.shared_step(batch)
        self.log("loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=False, logger=True, on_step=True)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        n = len(batch[self.first_stage_key])  # told to Lightning, which cannot infer it from a dict batch
        _, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=n)
        if self.use_ema:
            with self.ema_scope():
                _, loss_dict_ema = self.shared_step(batch)
            self.log_dict({k + "_ema": v for k, v in loss_dict_ema.items()}, logger=True, on_epoch=True,
                          batch_size=n)

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self):
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if not self.use_scheduler:
            return opt
        scheduler = instantiate_from_config(self.scheduler_config)
        print("Setting up LambdaLR scheduler...")
        lr_scheduler = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=scheduler.schedule),
                        "interval": "step", "frequency": 1}
        return [opt], [lr_scheduler]

    def on_validation_epoch_start(self):
        self._generators.pop("val", None)

    def on_save_checkpoint(self, checkpoint):
        g = self._generators.get("train")
        if g is not None:
            checkpoint["noise_generator_state"] = (g.device.type, g.get_state())

    def on_load_checkpoint(self, checkpoint):
        if "noise_generator_state" in checkpoint:
            self._generators.pop("train", None)
            self._pending_generator_state["train"] = checkpoint["noise_generator_state"]

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=2, sample=True, return_keys=None, **kwargs):
        x = self.get_input(batch, self.first_stage_key)[:N].to(self.device)
        log = {"inputs": x}
        if sample:
            with self.ema_scope("Plotting"):
                log["samples"] = self.sample(batch_size=x.shape[0])
        return {k: log[k] for k in return_keys if k in log} if return_keys else log


class LatentDiffusion(TextualInversion, DDPM):
    """Diffusion on the latents of a frozen first stage, conditioned by a text encoder."""

    def __init__(self, first_stage_config, cond_stage_config=None, num_timesteps_cond=None, cond_stage_key="image",
                 cond_stage_trainable=False, concat_mode=True, cond_stage_forward=None, conditioning_key=None,
                 scale_factor=1.0, scale_by_std=False, cache_first_stage_latents=True, conditioner_config=None,
                 compile_unet=False, *args, **kwargs):
        """`conditioner_config` (SDXL, Stability's name): a GeneralConditioner in place of `cond_stage_config`,
        kept as `self.conditioner` (the official `conditioner.embedders.N.*` keys), with `conditioning_key:
        crossattn-adm`. `compile_unet`: see `compile_unet()`."""
        if (cond_stage_config is None) == (conditioner_config is None):
            raise ValueError("LatentDiffusion needs exactly one of cond_stage_config and conditioner_config (SDXL).")
        if conditioner_config is not None and conditioning_key != "crossattn-adm":
            raise ValueError(f"conditioner_config (SDXL) needs conditioning_key: crossattn-adm, not "
                             f"{conditioning_key!r}: its conditioner gives the UNet a context and an ADM vector.")
        # The official configs pass num_timesteps_cond: 1; more would be the original's shortened conditioning
        # schedule (`shorten_cond_schedule`), which no official config uses and this code does not have.
        if num_timesteps_cond not in (None, 1):
            raise ValueError(f"num_timesteps_cond {num_timesteps_cond}: only 1 (the official configs' value) is "
                             "supported; remove the key or set it to 1.")
        self.scale_by_std = scale_by_std
        if conditioning_key is None:  # the original's backwards compatibility
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        # The weights a checkpoint fills are built empty and take the file's tensors: never randomly initialised
        # first, never held twice. Keys left out of the file (ignore_keys) keep a random start instead.
        with parameters_on_meta() if ckpt_path is not None and not ignore_keys else nullcontext():
            super().__init__(conditioning_key=conditioning_key, *args, **kwargs)
            self.cond_stage_trainable = cond_stage_trainable
            self.cond_stage_key = cond_stage_key
            if scale_by_std:
                self.register_buffer("scale_factor", torch.tensor(scale_factor))
            else:
                self.scale_factor = scale_factor
            self.instantiate_first_stage(first_stage_config)
            self.conditioner = None
            if conditioner_config is not None:
                self.conditioner = instantiate_from_config(conditioner_config)
            else:
                self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.cache_first_stage_latents = cache_first_stage_latents
        self._latent_cache = {}
        self._token_cache = {}
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

        if self.personalization_config is not None:
            self.setup_textual_inversion()
        if compile_unet:
            self.compile_unet()

    # ---------------------------------------------------------------- components
    def instantiate_first_stage(self, config):
        self.first_stage_model = freeze(instantiate_from_config(config))

    def instantiate_cond_stage(self, config):
        if config == "__is_first_stage__":
            print("Using first stage also as cond stage.")
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            print(f"Training {self.__class__.__name__} as an unconditional model.")
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            self.cond_stage_model = model if self.cond_stage_trainable else freeze(model)

    def compile_unet(self):
        """torch.compile the UNet in place (its state dict keys stay as they are): the first calls at each new
        input shape compile (tens of seconds on a CPU), later calls run the compiled code (docs/benchmarks.md)."""
        self.model.diffusion_model.compile()

    def text_encoders_module(self):
        """The module holding the text encoder(s): what textual inversion freezes and hands to its manager."""
        return self.conditioner if self.conditioner is not None else self.cond_stage_model

    def optional_weight_keys(self):
        """With a conditioner (SDXL), the schedule buffers: Stability's checkpoints do not hold them (their
        DiffusionEngine rebuilds the schedule from the config), and neither need ours."""
        if self.conditioner is None:
            return ()
        return tuple(name for name, _ in self.named_buffers(recurse=False))

    @property
    def latent_factor(self):
        """Pixels per latent pixel: 2 ** (number of downsamplings of the first stage's encoder)."""
        encoder = getattr(self.first_stage_model, "encoder", None)
        return 2 ** (encoder.num_resolutions - 1) if hasattr(encoder, "num_resolutions") else 1

    def get_first_stage_encoding(self, encoder_posterior):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        z = 1. / self.scale_factor * z
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def _tokens(self, texts):
        """Token ids of each caption, computed once: captions repeat every few steps in textual inversion."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._token_cache]
        if len(self._token_cache) + len(missing) > 100_000:  # open-ended caption sets (pretraining): stay bounded
            self._token_cache.clear()
        if missing:
            ids = self.cond_stage_model.tokenize(missing).cpu()
            self._token_cache.update(zip(missing, ids))
        return torch.stack([self._token_cache[t] for t in texts]).to(self.device)

    def get_learned_conditioning(self, c):
        if self.conditioner is not None:  # SDXL: a batch dict, or prompts (sized as the model's images)
            if not isinstance(c, dict):
                size = self.image_size * self.latent_factor
                c = conditioner_batch(list(c), size, size)
            return to_model_conditioning(self.conditioner(c, embedding_manager=self.embedding_manager))
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        model = self.cond_stage_model
        if not isinstance(model, TextEncoder):
            c = model(c)
        elif isinstance(c, (list, tuple)) and all(isinstance(t, str) for t in c):
            tokens = self._tokens(list(c))
            manager = self.embedding_manager
            c = model.encode_tokens(tokens) if manager is None else manager.encode_tokens(model, tokens)
        else:
            c = model.encode(c, embedding_manager=self.embedding_manager)
        if isinstance(c, DiagonalGaussianDistribution):
            c = c.mode()
        return c

    def _encoded(self, x, keys=None):
        """First-stage output for each image: a posterior, or a latent tensor for VQ/identity first stages.

        The first stage is frozen, so with `cache_key`s from the dataset each image (and its flip) is encoded
        once and its posterior moments are reused; a fresh latent is still drawn from them every step.
        """
        if keys is None or not self.cache_first_stage_latents:
            return self.encode_first_stage(x)
        # One image at a time: a convolution's result differs in the last bits with the batch's size and companions
        # (1.1e-6 on the tiny autoencoder), and a resumed run, whose cache starts empty, would encode other batches
        # than the run it continues: the one difference left between a resumed and an uninterrupted run.
        for i, key in enumerate(keys):
            if key not in self._latent_cache:
                out = self.encode_first_stage(x[i:i + 1])
                gaussian = isinstance(out, DiagonalGaussianDistribution)
                self._latent_cache[key] = ((out.parameters if gaussian else out)[0], gaussian)
        entries = [self._latent_cache[k] for k in keys]
        stacked = torch.stack([m for m, _ in entries])
        return DiagonalGaussianDistribution(stacked) if entries[0][1] else stacked

    def encode_to_latent(self, x, keys=None):
        encoded = self._encoded(x, keys)
        if isinstance(encoded, DiagonalGaussianDistribution):
            return self.scale_factor * encoded.sample(generator=self.noise_generator())
        return self.get_first_stage_encoding(encoded)

    @torch.no_grad()
    def get_input(self, batch, k, return_first_stage_outputs=False, force_c_encode=False, cond_key=None,
                  return_original_cond=False, bs=None):
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        keys = batch.get("cache_key") if isinstance(batch, dict) else None
        if keys is not None and bs is not None:
            keys = keys[:bs]
        z = self.encode_to_latent(x, keys).detach()

        c = xc = None
        if self.model.conditioning_key is not None:
            cond_key = cond_key or self.cond_stage_key
            xc = batch[cond_key] if cond_key in ("caption", "class_label") else super().get_input(batch, cond_key)
            if cond_key != self.first_stage_key and not isinstance(xc, (list, tuple, dict)):
                xc = xc.to(self.device)
            if cond_key == self.first_stage_key:
                xc = x
            if self.conditioner is not None:
                xc = conditioner_batch(list(xc)[:x.shape[0]], x.shape[-2], x.shape[-1], batch)
            c = xc
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            if bs is not None:
                c = slice_conditioning(c, bs)
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch, **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x, c, *args, **kwargs):
        t = self.sample_timesteps(x.shape[0], x.device)
        if self.model.conditioning_key is not None and self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, t, c, *args, **kwargs)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        x_recon = self.model(x_noisy, t, **self.model.keyword_conditioning(cond))
        return x_recon[0] if isinstance(x_recon, tuple) and not return_ids else x_recon

    # --------------------------------------------------------------- lightning
    def on_fit_start(self):
        self.match_frozen_unet_to_precision(self.trainer.precision)

    def match_frozen_unet_to_precision(self, precision):
        """Under mixed precision ("bf16-mixed", "16-mixed"), store a frozen UNet's weights in the autocast dtype.

        Otherwise autocast casts every fp32 weight on every call (it caches casts only of weights that require
        grad). Checkpoints of a frozen UNet do not hold its weights, so nothing saved changes.
        """
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
        unet = self.model.diffusion_model
        if dtype is not None and self.prunes_checkpoints and hasattr(unet, "convert_torso"):
            unet.convert_torso(dtype)

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)  # textual inversion's progressive words
        if self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0 \
                and not self.restarted_from_ckpt:
            assert self.scale_factor == 1., "rather not use custom rescaling and std-rescaling simultaneously"
            x = super().get_input(batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            del self.scale_factor
            self.register_buffer("scale_factor", 1. / z.flatten().std())
            self._latent_cache.clear()
            print(f"setting self.scale_factor to {self.scale_factor}")

    def trainable_parameters(self):
        if self.embedding_manager is None:
            params = list(self.model.parameters())
            if self.cond_stage_trainable and self.cond_stage_model is not None:
                print(f"{self.__class__.__name__}: Also optimizing conditioner params!")
                params += list(self.cond_stage_model.parameters())
            if self.learn_logvar:
                params.append(self.logvar)
            return params
        return self.textual_inversion_parameters()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sampling_conditioning(self, prompts, guided, shape=None, negative_prompts=None):
        """(cond, uncond) of `prompts` for sampling latents of `shape` (C, H, W); uncond only when `guided`.

        uncond is the conditioning of `negative_prompts` (one per prompt) when any of them is non-empty; else
        the empty prompt's, or with a conditioner (SDXL) its unconditional conditioning with the text zeroed,
        as Stability samples SDXL. A negative prompt is encoded like any prompt, so loaded embeddings
        (e.g. EasyNegative) work there by their word."""
        negative = list(negative_prompts) if negative_prompts is not None and any(negative_prompts) else None
        if negative is not None and len(negative) != len(prompts):
            raise ValueError(f"got {len(negative)} negative prompts for {len(prompts)} prompts")
        if self.conditioner is None:
            cond = self.get_learned_conditioning(prompts)
            return cond, (self.get_learned_conditioning(negative or len(prompts) * [""]) if guided else None)
        height, width = (shape[1], shape[2]) if shape else (self.image_size, self.image_size)
        batch = conditioner_batch(prompts, height * self.latent_factor, width * self.latent_factor)
        if not guided:
            return self.get_learned_conditioning(batch), None
        cond, uncond = self.conditioner.get_unconditional_conditioning(
            batch, {**batch, "txt": negative or len(prompts) * [""]},
            force_uc_zero_embeddings=[] if negative else ["txt"], embedding_manager=self.embedding_manager)
        return to_model_conditioning(cond), to_model_conditioning(uncond)

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=4, sample=True, ddim_steps=50, ddim_eta=1., return_keys=None,
                   unconditional_guidance_scale=5.0, sampler="ddim", negative_prompt="", validation_prompts=None,
                   **kwargs):
        """Inputs, reconstructions, the captions as images, and samples: the batch's captions with and without
        guidance, and with guidance the bare placeholder prompt ("a photo of *") or, when given, each of
        `validation_prompts` (`samples_validation_<i>`, `i` its place in the list). Guidance steers away from
        `negative_prompt` (default: the empty prompt). `sampler` names any sampler of
        `ldm.models.diffusion.generate.SAMPLERS` (`ddim_steps` steps; `ddim_eta` applies to DDIM only)."""
        _, _, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        N = x.shape[0]
        log = {"inputs": x, "reconstruction": xrec}
        conditional = self.model.conditioning_key is not None
        if conditional and self.cond_stage_key in ("caption",):
            log["conditioning"] = log_txt_as_img((x.shape[-1], x.shape[-2]), list(batch["caption"])[:N],
                                                 size=max(6, x.shape[-1] // 20)).to(x)
        if sample:
            prompts = (xc["txt"] if isinstance(xc, dict) else xc)[:N] if xc is not None else N * [""]
            draw = lambda prompts, scale=1.: generate(self, prompts, sampler, ddim_steps, scale, ddim_eta,
                                                      negative_prompt=negative_prompt)
            with self.ema_scope("Plotting"):
                log["samples"] = draw(prompts)
                if unconditional_guidance_scale != 1. and conditional:
                    log["samples_scaled"] = draw(prompts, unconditional_guidance_scale)
                    if validation_prompts:
                        for i, prompt in enumerate(validation_prompts):
                            log[f"samples_validation_{i}"] = draw(N * [prompt], unconditional_guidance_scale)
                    elif self.placeholder_prompt() is not None:
                        log["samples_placeholder"] = draw(N * [self.placeholder_prompt()],
                                                          unconditional_guidance_scale)
        return {k: log[k] for k in return_keys if k in log} if return_keys else log


class DiffusionWrapper(pl.LightningModule):
    """Holds the UNet under the official key `model.diffusion_model` and routes the conditioning to it: the one
    place that knows what each `conditioning_key` feeds the UNet (ldm.models.diffusion.conditioning)."""

    # conditioning_key -> which inputs it feeds: (channels concatenated to x, cross-attention context, ADM vector y)
    ROUTES = {None: (False, False, False), "concat": (True, False, False), "crossattn": (False, True, False),
              "hybrid": (True, True, False), "adm": (False, False, True), "crossattn-adm": (False, True, True)}

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in self.ROUTES:
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; use one of "
                             f"{', '.join(map(str, self.ROUTES))}")
        self.conditioning_key = conditioning_key

    def keyword_conditioning(self, cond):
        """A conditioning (a tensor, a list of them, or a dict of forward's keywords) as forward's keywords:
        a bare one is the concatenated input for `concat`, the cross-attention context (or, for `adm`, the
        original's way, the ADM vector) otherwise."""
        if isinstance(cond, dict):
            return cond
        return {"c_concat" if self.conditioning_key == "concat" else "c_crossattn":
                cond if isinstance(cond, list) else [cond]}

    def forward(self, x, t, c_concat=None, c_crossattn=None, y=None):
        concat, crossattn, adm = self.ROUTES[self.conditioning_key]
        kwargs = {}
        if concat:
            x = torch.cat([x] + c_concat, dim=1)
        if crossattn:
            kwargs["context"] = torch.cat(c_crossattn, 1)
        if adm:  # SDXL passes y beside its context; the original's adm passed it as c_crossattn
            kwargs["y"] = c_crossattn[0] if y is None and not crossattn else y
        return self.diffusion_model(x, t, **kwargs)
