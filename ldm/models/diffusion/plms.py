"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

Each DDIM update is fed an Adams-Bashforth combination of the current and up to three previous
noise estimates; the very first step, which has no history, uses a pseudo improved-Euler step.
"""
import torch

from ldm.models.diffusion.ddim_schedule_sampler import DDIMScheduleSampler

# Adams-Bashforth weights for the current estimate followed by the previous ones, newest first.
ADAMS_BASHFORTH = {
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class PLMSSampler(DDIMScheduleSampler):
    desc = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def stepper(self, conditioning, step_kwargs):
        old_eps = []  # this call's history of noise estimates, newest last

        def step(x, t, t_next, index):
            x_prev, pred_x0, e_t = self.p_sample_plms(x, conditioning, t, index, old_eps=old_eps, t_next=t_next,
                                                      **step_kwargs)
            old_eps[:] = (old_eps + [e_t])[-3:]
            return x_prev, pred_x0

        return step

    @torch.no_grad()
    def p_sample_plms(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1., unconditional_conditioning=None, old_eps=None, t_next=None):
        """One PLMS step; returns (x_prev, pred_x0, e_t) where e_t is this step's raw estimate for the history."""
        old_eps = old_eps or []
        eps = lambda x, t: self.model_eps(x, t, c, unconditional_guidance_scale, unconditional_conditioning,
                                          score_corrector, corrector_kwargs)
        update = lambda e: self.ddim_step(x, e, index, use_original_steps, quantize_denoised, temperature,
                                          noise_dropout, repeat_noise)
        e_t = eps(x, t)
        if not old_eps:
            x_next, _ = update(e_t)
            e_t_prime = (e_t + eps(x_next, t_next)) / 2
        else:
            weights = ADAMS_BASHFORTH[len(old_eps)]
            history = [e_t] + old_eps[::-1]
            e_t_prime = sum(w * e for w, e in zip(weights, history))
        x_prev, pred_x0 = update(e_t_prime)
        return x_prev, pred_x0, e_t
