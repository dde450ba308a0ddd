"""Samplers in sigma space, in the style of k-diffusion (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): each sampler is a short function over a denoiser D(x, sigma) -> x0.

The diffusion model is seen as x = x0 + sigma * eps (sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod));
`Denoiser` turns a LatentDiffusion (eps, x0 or v prediction, with classifier-free guidance) into D. The
samplers and their default step schedules follow diffusers' schedulers of the same names, step for step
(tests/test_k_samplers.py compares them):

    euler            EulerDiscreteScheduler
    euler_a          EulerAncestralDiscreteScheduler
    heun             HeunDiscreteScheduler
    dpmpp_2m         DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2)
    dpmpp_sde        DPMSolverSDEScheduler (noise from `BrownianNoise`, see there)
    unipc            UniPCMultistepScheduler (bh2, solver_order=2)

Sigmas are 1-D float64 CPU tensors ending with 0; step coefficients are Python floats, so no step waits
on the device and nothing needs float64 on it (MPS has none).
"""
import bisect
import math

import numpy as np
import torch

from ldm.models.diffusion.conditioning import guided_output
from ldm.util import model_dtype


# ------------------------------------------------------------------------------------------- the denoiser
class Denoiser:
    """D(x, sigma): the model's estimate of x0 from x = x0 + sigma * eps, with classifier-free guidance.

    The model sees x / sqrt(sigma^2 + 1) (the DDPM sample of the same noise level) at the timestep whose
    sigma this is, interpolated in log sigma between the trained timesteps (`quantize` rounds it to the
    nearest trained one, as diffusers' multistep solvers do). Guidance: conditioning.guided_output.
    """

    def __init__(self, model, cond, uncond=None, scale=1.0, quantize=False):
        self.model, self.cond, self.uncond, self.scale, self.quantize = model, cond, uncond, scale, quantize
        alphas_cumprod = model.alphas_cumprod.detach().to("cpu", torch.float64)
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod).sqrt().log()).numpy()
        self.dtype = model_dtype(model)

    @property
    def sigma_min(self):
        return math.exp(self.log_sigmas[0])

    @property
    def sigma_max(self):
        return math.exp(self.log_sigmas[-1])

    def t_to_sigma(self, t):
        return np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas))

    def sigma_to_t(self, sigma):
        """The (fractional) timestep of `sigma`: the inverse of `t_to_sigma` (log sigma rises with t)."""
        t = float(np.interp(math.log(sigma), self.log_sigmas, np.arange(len(self.log_sigmas))))
        return round(t) if self.quantize else t

    def model_output(self, x, t):
        t = torch.full((x.shape[0],), t, device=x.device)
        return guided_output(self.model, x, t, self.cond, self.uncond, self.scale)

    def __call__(self, x, sigma):
        c_in = 1 / math.sqrt(sigma ** 2 + 1)
        out = self.model_output((x * c_in).to(self.dtype), self.sigma_to_t(sigma))
        # x = x_t / sqrt(a_t) in sigma space, so x_t = x * c_in and a_t = c_in^2; a 0-dim CPU tensor acts as a
        # scalar on any device, so no per-step host-to-device copy
        a_t = torch.tensor(c_in ** 2, dtype=torch.float64)
        return self.model.prediction.to_x0(x * c_in, out, a_t)


# ------------------------------------------------------------------------------------------- schedules
def get_sigmas(denoiser, n, schedule="linspace"):
    """n noise levels, highest first, then 0.

    linspace: n timesteps evenly from the last trained one to 0 (fractional; diffusers' Euler/Heun/SDE default)
    discrete: n + 1 evenly spaced trained timesteps, rounded, without t = 0 (diffusers' multistep solvers)
    karras:   Karras et al.'s rho = 7 spacing between the model's smallest and largest sigma
    """
    if n < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
    last = len(denoiser.log_sigmas) - 1
    if schedule == "linspace":
        sigmas = denoiser.t_to_sigma(np.linspace(last, 0, n))
    elif schedule == "discrete":
        sigmas = denoiser.t_to_sigma(np.linspace(0, last, n + 1).round()[::-1][:-1])
    elif schedule == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        max_r, min_r = denoiser.sigma_max ** (1 / rho), denoiser.sigma_min ** (1 / rho)
        sigmas = (max_r + ramp * (min_r - max_r)) ** rho
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected linspace, discrete or karras")
    return torch.tensor(np.append(sigmas, 0.0), dtype=torch.float64)


# ------------------------------------------------------------------------------------------- noise
def gaussian(shape, generator, device):
    """Standard normal noise drawn on the generator's device (a CPU generator: the same noise on every device)."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


class BrownianNoise:
    """Noise for SDE samplers from one Brownian motion W(sigma), sampled only where asked.

    `noise(a, b)` is (W(b) - W(a)) / sqrt(|b - a|): standard normal for each interval, and consistent
    between intervals that overlap (DPM++ SDE asks for sigma -> midpoint, then sigma -> next). A new point
    between two known ones is drawn from the Brownian bridge between them, outside them by a free
    increment, so the path has the law of a Brownian motion whatever the query order; the draws come
    from `generator`. This is what k-diffusion's torchsde Brownian tree provides, without torchsde (and
    with other random numbers, so the same seed gives other images than diffusers' scheduler).
    """

    def __init__(self, shape, generator=None, device="cpu"):
        self.shape, self.generator, self.device = shape, generator, device
        self.sigmas, self.values = [], []

    def _w(self, s):
        i = bisect.bisect_left(self.sigmas, s)
        if i < len(self.sigmas) and self.sigmas[i] == s:
            return self.values[i]
        z = gaussian(self.shape, self.generator, self.device)
        if not self.sigmas:
            w = torch.zeros(self.shape, device=self.device)
        elif i == 0:
            w = self.values[0] + math.sqrt(self.sigmas[0] - s) * z
        elif i == len(self.sigmas):
            w = self.values[-1] + math.sqrt(s - self.sigmas[-1]) * z
        else:
            (lo, w_lo), (hi, w_hi) = (self.sigmas[i - 1], self.values[i - 1]), (self.sigmas[i], self.values[i])
            f = (s - lo) / (hi - lo)
            w = w_lo + f * (w_hi - w_lo) + math.sqrt(f * (hi - s)) * z
        self.sigmas.insert(i, s)
        self.values.insert(i, w)
        return w

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = float(sigma), float(sigma_next)
        return (self._w(sigma_next) - self._w(sigma)) / math.sqrt(abs(sigma_next - sigma))


def ancestral_step(sigma, sigma_next, eta=1.0):
    """Split a step to sigma_next into a deterministic step to sigma_down and fresh noise of std sigma_up."""
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


# ------------------------------------------------------------------------------------------- samplers
# Each: (denoise, x at sigmas[0], sigmas[, noise]) -> x at 0; `callback(i, x, denoised)` after step i.

def _report(callback, i, x, denoised):
    if callback is not None:
        callback(i, x, denoised)


def euler(denoise, x, sigmas, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    sigmas = sigmas.tolist()
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, s)
        x = x + (x - denoised) / s * (s_next - s)
        _report(callback, i, x, denoised)
    return x


def euler_ancestral(denoise, x, sigmas, noise, callback=None):
    """Euler down to sigma_down, then fresh noise of std sigma_up (eta = 1): a stochastic sampler."""
    sigmas = sigmas.tolist()
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, s)
        sigma_down, sigma_up = ancestral_step(s, s_next)
        x = x + (x - denoised) / s * (sigma_down - s)
        if s_next > 0:
            x = x + noise(s, s_next) * sigma_up
        _report(callback, i, x, denoised)
    return x


def heun(denoise, x, sigmas, callback=None):
    """Heun's second-order method (Karras et al. Algorithm 1, no churn); Euler for the last step to 0."""
    sigmas = sigmas.tolist()
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, s)
        d = (x - denoised) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, s_next)) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
        _report(callback, i, x, denoised)
    return x


def _exp_step(x, denoised, sigma, sigma_next):
    """The first-order DPM-Solver++ step (exact for a constant x0 estimate) from sigma to sigma_next."""
    if sigma_next == 0:
        return denoised
    return sigma_next / sigma * x - math.expm1(math.log(sigma_next / sigma)) * denoised


def dpmpp_2m(denoise, x, sigmas, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log sigma; first order at both ends."""
    sigmas = sigmas.tolist()
    old = None
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, s)
        d = denoised
        if old is not None and s_next > 0:
            r = math.log(sigmas[i - 1] / s) / math.log(s / s_next)  # previous step size / this one
            d = denoised + (denoised - old) / (2 * r)
        x = _exp_step(x, d, s, s_next)
        old = denoised
        _report(callback, i, x, denoised)
    return x


def dpmpp_sde(denoise, x, sigmas, noise, callback=None):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, eta = 1, r = 1/2): two ancestral half steps in log
    sigma, the second from the start with the midpoint's x0 estimate; Euler for the last step to 0."""
    sigmas = sigmas.tolist()
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, s)
        if s_next == 0:
            x = denoised
        else:
            s_mid = math.sqrt(s * s_next)
            sigma_down, sigma_up = ancestral_step(s, s_mid)
            x_mid = _exp_step(x, denoised, s, sigma_down) + noise(s, s_mid) * sigma_up
            sigma_down, sigma_up = ancestral_step(s, s_next)
            x = _exp_step(x, denoise(x_mid, s_mid), s, sigma_down) + noise(s, s_next) * sigma_up
        _report(callback, i, x, denoised)
    return x


def _unipc_rhs(h, b_h):
    """b_1, b_2 of UniC-2's linear system for B(h) = b_h: b_k = k! h phi_{k+1}(h) / B(h), where
    h phi_1 = expm1(-h) and h phi_{k+1} = h phi_k / (-h) - 1 / k! (all with the sign of data prediction)."""
    h_phi_2 = math.expm1(-h) / -h - 1
    h_phi_3 = h_phi_2 / -h - 0.5
    return h_phi_2 / b_h, 2 * h_phi_3 / b_h


def _unipc_update(x, history, sigma_next, denoised_next=None):
    """One UniPC step (Zhao et al. 2023) in data prediction with B(h) = expm1(-h) ("bh2").

    history: [(sigma, x0 estimate), ...] newest last, x at the newest sigma; its length (1 or 2) is the order.
    Without `denoised_next` this is the predictor UniP to sigma_next; given the x0 estimate at sigma_next
    (made from the predicted sample), the corrector UniC, which redoes the same step.
    """
    s0, m0 = history[-1]
    if sigma_next == 0:
        return m0
    h = math.log(s0 / sigma_next)
    b_h = math.expm1(-h)
    x_next = sigma_next / s0 * x - b_h * m0  # DPM-Solver++(1)
    if len(history) == 1:
        return x_next if denoised_next is None else x_next - b_h * 0.5 * (denoised_next - m0)
    s1, m1 = history[-2]
    r1 = math.log(s0 / s1) / h  # negative: the previous point lies before s0
    d1 = (m1 - m0) / r1
    if denoised_next is None:
        return x_next - b_h * 0.5 * d1
    b1, b2 = _unipc_rhs(h, b_h)
    rho_0 = (b1 - b2) / (1 - r1)  # solves [[1, 1], [r1, 1]] @ rho = [b1, b2]
    return x_next - b_h * (rho_0 * d1 + (b1 - rho_0) * (denoised_next - m0))


def unipc(denoise, x, sigmas, callback=None):
    """UniPC-2 (bh2), as diffusers' default: each step's new x0 estimate first corrects the step just taken
    (UniC), then drives the next step (UniP); first order on the first and the last step."""
    sigmas = sigmas.tolist()
    history, previous = [], None
    n = len(sigmas) - 1
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, s)
        if previous is not None:
            x = _unipc_update(previous, history, s, denoised)
        history = (history + [(s, denoised)])[-min(2, n - i):]
        previous = x
        x = _unipc_update(x, history, s_next)
        _report(callback, i, x, denoised)
    return x
