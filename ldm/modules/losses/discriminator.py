"""PatchGAN discriminator of the first-stage GAN losses (the original imported these from taming-transformers).

Parameter names match taming's (`main.N.*`, ActNorm `loc`/`scale`/`initialized`), so its checkpoints load.
"""
import torch
import torch.nn as nn


def weights_init(m):
    """DCGAN initialisation, applied with `module.apply(weights_init)`."""
    classname = m.__class__.__name__
    if "Conv" in classname:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in classname:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0)


class ActNorm(nn.Module):
    """Per-channel affine layer whose scale and shift are set from the first training batch (Glow's ActNorm)."""

    def __init__(self, num_features, logdet=False, affine=True, allow_reverse_init=False):
        super().__init__()
        if not affine:
            raise ValueError("ActNorm is always affine.")
        self.logdet = logdet
        self.allow_reverse_init = allow_reverse_init
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        # A buffer, not a Python flag, so that a loaded checkpoint is not re-initialised.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)

    def _maybe_initialize(self, x):
        if self.training and self.initialized.item() == 0:
            self.initialize(x)

    def forward(self, x, reverse=False):
        if reverse:
            return self.reverse(x)
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, :, None, None]
        self._maybe_initialize(x)
        h = self.scale * (x + self.loc)
        if squeeze:
            h = h[:, :, 0, 0]
        if self.logdet:
            height, width = x.shape[2:]
            logdet = height * width * torch.sum(torch.log(torch.abs(self.scale)))
            return h, logdet * torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
        return h

    def reverse(self, y):
        if self.training and self.initialized.item() == 0 and not self.allow_reverse_init:
            raise RuntimeError("Initializing ActNorm in reverse direction is disabled by default. "
                               "Use allow_reverse_init=True to enable.")
        squeeze = y.ndim == 2
        if squeeze:
            y = y[:, :, None, None]
        self._maybe_initialize(y)
        h = y / self.scale - self.loc
        return h[:, :, 0, 0] if squeeze else h


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator as in pix2pix: a map of real/fake logits, one per overlapping image patch."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3, use_actnorm=False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own shift, so the conv before it needs no bias
        kw, padw = 4, 1
        layers = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers + 1):
            nf_mult_prev, nf_mult = nf_mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=stride, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)
