"""First-stage autoencoders: AutoencoderKL (Stable Diffusion's), VQModel, and IdentityFirstStage.

Both trainable models are GANs with two optimizers (autoencoder, discriminator). Lightning 2 dropped
`optimizer_idx`, so they optimise manually: per batch, one autoencoder step, then one discriminator step.
"""
from contextlib import nullcontext

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.checkpoint import load_weights
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


class _AdversarialAutoencoder(pl.LightningModule):
    """Training, validation and image logging shared by AutoencoderKL and VQModel.

    Subclasses build `encoder`, `decoder`, `loss`, `quant_conv`, `post_quant_conv` and define
    `_reconstruct(x)` (forward outputs for the loss) and `_loss(x, outputs, optimizer_idx, step, split)`.
    """

    def __init__(self, ddconfig, lossconfig, image_key="image", colorize_nlabels=None, monitor=None):
        super().__init__()
        self.automatic_optimization = False
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise TypeError("colorize_nlabels must be an int.")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor

    def init_from_ckpt(self, path, ignore_keys=()):
        load_weights(self, path, ignore_keys)

    def get_input(self, batch, k):
        """Images are stored (b, h, w, c) in [-1, 1]; the networks take (b, c, h, w)."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self):
        return self.decoder.conv_out.weight

    def _loss_step(self):
        # The original's global_step, and so the losses' `disc_start`, counted batches; Lightning 2's
        # global_step counts every optimizer step, and the discriminator's steps start late.
        return max(self.trainer.fit_loop.total_batch_idx, 0)

    def _schedulers(self):
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return [None, None]
        return list(schedulers) if isinstance(schedulers, list) else [schedulers, None]

    def training_step(self, batch, batch_idx):
        opt_ae, opt_disc = self.optimizers()
        sched_ae, sched_disc = self._schedulers()
        step = self._loss_step()
        x = self.get_input(batch, self.image_key)
        outputs = self._reconstruct(x)

        self._optimizer_step(opt_ae, sched_ae, x, outputs, 0, step, "aeloss")
        # Before disc_start the discriminator's loss has weight 0: its step would change nothing.
        if self.loss.discriminator_active(step):
            self._optimizer_step(opt_disc, sched_disc, x, outputs, 1, step, "discloss")

    def _optimizer_step(self, opt, sched, x, outputs, optimizer_idx, step, name):
        """One step of the autoencoder (optimizer_idx 0) or the discriminator (1), with its logging."""
        with self.toggled_optimizer(opt):
            loss, log = self._loss(x, outputs, optimizer_idx, step, "train")
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        if sched is not None:
            sched.step()
        self.log(name, loss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log_dict(log, prog_bar=False, logger=True, on_step=True, on_epoch=False)

    def _validation_step(self, batch, split):
        x = self.get_input(batch, self.image_key)
        outputs = self._reconstruct(x)
        step = self._loss_step()
        _, log_ae = self._loss(x, outputs, 0, step, split)
        _, log_disc = self._loss(x, outputs, 1, step, split)
        self.log_dict(log_ae)
        self.log_dict(log_disc)
        return log_ae

    def validation_step(self, batch, batch_idx):
        return self._validation_step(batch, "val")

    def _adam(self, params, lr):
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))

    def _autoencoder_parameters(self):
        return [p for m in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv) for p in m.parameters()]

    def to_rgb(self, x):
        """Project a segmentation map with many channels to 3 random colour channels in [-1, 1]."""
        if self.image_key != "segmentation":
            raise ValueError("to_rgb is meant for segmentation maps (image_key 'segmentation').")
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class AutoencoderKL(_AdversarialAutoencoder):
    """Encodes images to a diagonal Gaussian posterior over latents of `embed_dim` channels."""

    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=[], image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__(ddconfig, lossconfig, image_key=image_key, colorize_nlabels=colorize_nlabels,
                         monitor=monitor)
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z: True (the encoder outputs mean and logvar).")
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _reconstruct(self, x):
        return self(x)

    def _loss(self, x, outputs, optimizer_idx, step, split):
        reconstructions, posterior = outputs
        return self.loss(x, reconstructions, posterior, optimizer_idx, step,
                         last_layer=self.get_last_layer(), split=split)

    def configure_optimizers(self):
        lr = self.learning_rate
        return [self._adam(self._autoencoder_parameters(), lr),
                self._adam(self.loss.discriminator.parameters(), lr)], []

    @torch.no_grad()
    def log_images(self, batch, only_inputs=False, **kwargs):
        log = dict()
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            if x.shape[1] > 3:
                x, xrec = self.to_rgb(x), self.to_rgb(xrec)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            log["reconstructions"] = xrec
        log["inputs"] = x
        return log


class VQModel(_AdversarialAutoencoder):
    """Encodes images to `embed_dim`-channel latents snapped to a codebook of `n_embed` vectors."""

    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=[], image_key="image",
                 colorize_nlabels=None, monitor=None, batch_resize_range=None, scheduler_config=None,
                 lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False):
        try:
            from taming.modules.vqvae.quantize import VectorQuantizer2
        except ImportError as e:
            raise ImportError(
                "VQModel needs VectorQuantizer2 from taming-transformers, which is not installed. Install it with "
                "`pip install --no-deps taming-transformers-rom1504` (the PyPI package 'taming-transformers' "
                "lacks VectorQuantizer2).") from e
        super().__init__(ddconfig, lossconfig, image_key=image_key, colorize_nlabels=colorize_nlabels,
                         monitor=monitor)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap,
                                         sane_index_shape=sane_index_shape)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.batch_resize_range = batch_resize_range
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor

    def ema_scope(self, context=None):
        """Temporarily swap in the EMA weights (a no-op without EMA)."""
        return self.model_ema.swapped_in(self, context) if self.use_ema else nullcontext()

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self)

    def encode(self, x):
        quant, emb_loss, info = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, emb_loss, info

    def encode_to_prequant(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input, return_pred_indices=False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_input(self, batch, k):
        x = super().get_input(batch, k)
        if self.batch_resize_range is None:
            return x
        lower, upper = self.batch_resize_range
        # The first batches run at the largest size, so that running out of memory shows up at once.
        size = upper if self.global_step <= 4 else int(np.random.choice(np.arange(lower, upper + 16, 16)))
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    def _reconstruct(self, x):
        return self(x, return_pred_indices=True)

    def _loss(self, x, outputs, optimizer_idx, step, split):
        xrec, qloss, ind = outputs
        return self.loss(qloss, x, xrec, optimizer_idx, step, last_layer=self.get_last_layer(), split=split,
                         predicted_indices=ind)

    def validation_step(self, batch, batch_idx):
        log = self._validation_step(batch, "val")
        with self.ema_scope():
            self._validation_step(batch, "val_ema")
        return log

    def _autoencoder_parameters(self):
        return super()._autoencoder_parameters() + list(self.quantize.parameters())

    def configure_optimizers(self):
        lr_d = self.learning_rate
        lr_g = self.lr_g_factor * self.learning_rate
        opt_ae = self._adam(self._autoencoder_parameters(), lr_g)
        opt_disc = self._adam(self.loss.discriminator.parameters(), lr_d)
        if self.scheduler_config is None:
            return [opt_ae, opt_disc], []
        schedule = instantiate_from_config(self.scheduler_config).schedule
        return [opt_ae, opt_disc], [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule)
                                    for opt in (opt_ae, opt_disc)]

    @torch.no_grad()
    def log_images(self, batch, only_inputs=False, plot_ema=False, **kwargs):
        log = dict()
        x = self.get_input(batch, self.image_key).to(self.device)
        if only_inputs:
            log["inputs"] = x
            return log
        reconstructions = {"reconstructions": self(x)[0]}
        if plot_ema:
            with self.ema_scope():
                reconstructions["reconstructions_ema"] = self(x)[0]
        rgb = self.to_rgb if x.shape[1] > 3 else (lambda t: t)
        log["inputs"] = rgb(x)
        log.update({name: rgb(xrec) for name, xrec in reconstructions.items()})
        return log


class VQModelInterface(VQModel):
    """The VQ first stage as a latent diffusion model uses it: `encode` stops before quantisation,
    `decode` quantises (unless told not to) and decodes."""

    def __init__(self, embed_dim, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x):
        return self.encode_to_prequant(x)

    def decode(self, h, force_not_quantize=False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return super().decode(quant)


class IdentityFirstStage(torch.nn.Module):
    """A first stage that does nothing: diffusion in pixel space."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x, *args, **kwargs):
        return x
