"""Adversarial reconstruction losses of the first stages; the shared GAN machinery lives here, as in taming.

LPIPS (the perceptual term) needs VGG weights that are downloaded on first use. With `perceptual_weight: 0`
it is never built; otherwise it is imported from taming-transformers only when the loss is constructed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight, global_step, threshold=0, value=0.0):
    """`weight` from step `threshold` on, `value` before."""
    return value if global_step < threshold else weight


def measure_perplexity(predicted_indices, n_embed):
    """Perplexity of the codebook usage, and how many codes were used at all."""
    avg_probs = F.one_hot(predicted_indices.reshape(-1), n_embed).float().mean(0)
    perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
    return perplexity, torch.sum(avg_probs > 0)


def l1(x, y):
    return torch.abs(x - y)


def l2(x, y):
    return torch.pow(x - y, 2)


def build_lpips():
    try:
        from taming.modules.losses.lpips import LPIPS
    except ImportError as e:
        raise ImportError(
            "perceptual_weight > 0 needs the LPIPS loss of taming-transformers: "
            "`pip install --no-deps taming-transformers-rom1504` (it also needs torchvision), "
            "or set perceptual_weight: 0 in the loss config.") from e
    try:
        return LPIPS().eval()
    except Exception as e:  # network or file errors while fetching the VGG weights, whatever their type
        raise RuntimeError(
            "LPIPS could not load its VGG weights (taming downloads them on first use). "
            "Make them available offline, or set perceptual_weight: 0 in the loss config.") from e


class AdversarialLoss(nn.Module):
    """What the KL and VQ losses share: the PatchGAN discriminator, its loss, the optional LPIPS term and
    the adaptive weight that balances the GAN gradient against the reconstruction gradient."""

    def __init__(self, disc_start, disc_num_layers=3, disc_in_channels=3, disc_factor=1.0, disc_weight=1.0,
                 perceptual_weight=1.0, use_actnorm=False, disc_conditional=False, disc_ndf=64, disc_loss="hinge"):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss '{disc_loss}' unknown (use one of {sorted(DISC_LOSSES)}).")
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            self.perceptual_loss = build_lpips()
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm, ndf=disc_ndf).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def discriminator_active(self, global_step):
        """Whether the GAN terms have any weight at this step (none before `disc_start`)."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start) > 0

    def perceptual(self, inputs, reconstructions):
        """LPIPS distance per image, (b, 1, 1, 1); zero when perceptual_weight is 0."""
        if self.perceptual_weight > 0:
            return self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
        return inputs.new_zeros(inputs.shape[0], 1, 1, 1)

    def logits(self, x, cond=None):
        if (cond is not None) != self.disc_conditional:
            raise ValueError(f"disc_conditional is {self.disc_conditional} but cond is "
                             f"{'given' if cond is not None else 'missing'}.")
        if cond is not None:
            x = torch.cat((x, cond), dim=1)
        return self.discriminator(x.contiguous())

    def calculate_adaptive_weight(self, nll_loss, g_loss, last_layer):
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def generator_loss(self, nll_loss, reconstructions, global_step, last_layer=None, cond=None):
        """(g_loss, d_weight, disc_factor) for the autoencoder's step. Before disc_start the GAN term has no
        weight, so the discriminator pass and the adaptive weight's extra gradients are skipped."""
        zero = nll_loss.new_zeros(())
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if disc_factor == 0:
            return zero, zero, disc_factor
        g_loss = -torch.mean(self.logits(reconstructions, cond))
        if not nll_loss.requires_grad:
            # Validation runs without a graph; the original also used weight 0 there.
            return g_loss, zero, disc_factor
        if last_layer is None:
            raise ValueError("last_layer (the decoder's last weight) is needed for the adaptive GAN weight.")
        return g_loss, self.calculate_adaptive_weight(nll_loss, g_loss, last_layer), disc_factor

    def discriminator_step_loss(self, inputs, reconstructions, global_step, cond=None, split="train"):
        logits_real = self.logits(inputs.detach(), cond)
        logits_fake = self.logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log


class VQLPIPSWithDiscriminator(AdversarialLoss):
    """Loss of VQModel: pixel (+ LPIPS) reconstruction, codebook loss, and the GAN terms.
    optimizer_idx 0 is the autoencoder's loss, 1 the discriminator's."""

    def __init__(self, disc_start, codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False,
                 disc_conditional=False, disc_ndf=64, disc_loss="hinge", n_classes=None,
                 perceptual_loss="lpips", pixel_loss="l1"):
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss '{perceptual_loss}' unsupported (only 'lpips').")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss '{pixel_loss}' unknown (use 'l1' or 'l2').")
        super().__init__(disc_start, disc_num_layers=disc_num_layers, disc_in_channels=disc_in_channels,
                         disc_factor=disc_factor, disc_weight=disc_weight, perceptual_weight=perceptual_weight,
                         use_actnorm=use_actnorm, disc_conditional=disc_conditional, disc_ndf=disc_ndf,
                         disc_loss=disc_loss)
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.n_classes = n_classes
        self.pixel_loss = l1 if pixel_loss == "l1" else l2

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
                cond=None, split="train", predicted_indices=None):
        if optimizer_idx == 1:
            return self.discriminator_step_loss(inputs, reconstructions, global_step, cond=cond, split=split)
        if codebook_loss is None:
            codebook_loss = inputs.new_zeros(1)
        p_loss = self.perceptual(inputs, reconstructions)
        rec_loss = self.pixel_loss(inputs.contiguous(), reconstructions.contiguous()) \
            + self.perceptual_weight * p_loss
        nll_loss = torch.mean(rec_loss)
        g_loss, d_weight, disc_factor = self.generator_loss(nll_loss, reconstructions, global_step,
                                                            last_layer=last_layer, cond=cond)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach().mean()}
        if predicted_indices is not None:
            if self.n_classes is None:
                raise ValueError("n_classes (the codebook size) is needed to measure perplexity.")
            with torch.no_grad():
                perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_usage
        return loss, log
