"""What the denoiser predicts: the noise (eps), the clean sample (x0) or the velocity (v, SD 2.x 768-px).

One object owns the three conversions, so training and every sampler agree. All of them take `a_t`, the
cumulative alpha (alpha-bar) at each sample's timestep, broadcastable to the sample (e.g.
`extract_into_tensor(alphas_cumprod, t, x.shape)`), with x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps and
v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 (Salimans & Ho 2022, as Stability's code and diffusers' "v_prediction").
"""
import torch

KINDS = ("eps", "x0", "v")


class Prediction:
    def __init__(self, kind):
        if kind not in KINDS:
            raise ValueError(f"parameterization must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        self.kind = kind

    def __repr__(self):
        return f"Prediction({self.kind!r})"

    def target(self, x0, noise, a_t):
        """The training target for a model that saw x_t made from `x0` and `noise`."""
        if self.kind == "eps":
            return noise
        if self.kind == "x0":
            return x0
        return a_t.sqrt() * noise - (1. - a_t).sqrt() * x0

    def to_x0(self, x_t, out, a_t):
        """The clean sample implied by the model output `out` at x_t."""
        if self.kind == "eps":
            return (x_t - (1. - a_t).sqrt() * out) / a_t.sqrt()
        if self.kind == "x0":
            return out
        return a_t.sqrt() * x_t - (1. - a_t).sqrt() * out

    def to_eps(self, x_t, out, a_t):
        """The noise implied by the model output `out` at x_t."""
        if self.kind == "eps":
            return out
        if self.kind == "x0":
            return (x_t - a_t.sqrt() * out) / (1. - a_t).sqrt()
        return a_t.sqrt() * out + (1. - a_t).sqrt() * x_t

    def vlb_weights(self, betas, alphas, alphas_cumprod, posterior_variance):
        """Per-timestep weights of the VLB term (`original_elbo_weight`), as the original computes them.

        eps: beta^2 / (2 sigma^2 alpha (1 - a_t)); x0: the original's expression (kept as written); v: ones,
        as Stability's SD 2.x code. The first entry (inf/nan for eps) borrows its neighbour's.
        """
        if self.kind == "eps":
            weights = betas ** 2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
        elif self.kind == "x0":
            weights = 0.5 * alphas_cumprod.sqrt() / (2. * 1 - alphas_cumprod)
        else:
            weights = torch.ones_like(betas)
        weights[0] = weights[1]
        return weights
