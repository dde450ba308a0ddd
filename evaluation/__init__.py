"""Metrics for textual inversion: the paper's CLIP similarities (clip_eval) and the toy shapes
evaluator (shapes_eval), plus the sampling both apply to a model."""
import torch


@torch.no_grad()
def sample_images(model, prompt, n_samples, ddim_steps=50, scale=5.0, eta=0.0, batch_size=8, seed=0, sampler="ddim"):
    """n_samples images of a LatentDiffusion for one prompt: a (n, 3, H, W) CPU tensor in [-1, 1].

    `sampler` is any name of `ldm.models.diffusion.generate.SAMPLERS`, run for `ddim_steps` steps, with
    classifier-free guidance when scale != 1. A CPU generator makes the same seed give the same images on
    every device.
    """
    from ldm.models.diffusion.generate import generate

    generator = torch.Generator().manual_seed(seed)
    sizes = [min(batch_size, n_samples - start) for start in range(0, n_samples, batch_size)]
    with model.ema_scope():
        return torch.cat([generate(model, n * [prompt], sampler, ddim_steps, scale, eta, generator).cpu()
                          for n in sizes])
