"""Loss of AutoencoderKL: a Gaussian reconstruction likelihood with learned variance, KL to the prior,
and the PatchGAN terms once `disc_start` is reached."""
import torch
import torch.nn as nn

from ldm.modules.losses.vqperceptual import AdversarialLoss


class LPIPSWithDiscriminator(AdversarialLoss):
    """optimizer_idx 0 gives the autoencoder's loss, 1 the discriminator's.

    The toy setting is `perceptual_weight: 0` (no LPIPS, nothing to download) with `disc_start` beyond the
    last step (the discriminator is never consulted for the autoencoder's loss).
    """

    def __init__(self, disc_start, logvar_init=0.0, kl_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False,
                 disc_conditional=False, disc_loss="hinge"):
        super().__init__(disc_start, disc_num_layers=disc_num_layers, disc_in_channels=disc_in_channels,
                         disc_factor=disc_factor, disc_weight=disc_weight, perceptual_weight=perceptual_weight,
                         use_actnorm=use_actnorm, disc_conditional=disc_conditional, disc_loss=disc_loss)
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=None, cond=None,
                split="train", weights=None):
        if optimizer_idx == 1:
            return self.discriminator_step_loss(inputs, reconstructions, global_step, cond=cond, split=split)
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous()) \
            + self.perceptual_weight * self.perceptual(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        # Sums over pixels, means over the batch.
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss, d_weight, disc_factor = self.generator_loss(nll_loss, reconstructions, global_step,
                                                            last_layer=last_layer, cond=cond)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
