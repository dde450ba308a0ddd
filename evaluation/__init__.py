"""Metrics for textual inversion: the paper's CLIP similarities (clip_eval) and the toy shapes
evaluator (shapes_eval), plus the sampling both apply to a model."""
import torch


@torch.no_grad()
def sample_images(model, prompt, n_samples, ddim_steps=50, scale=5.0, eta=0.0, batch_size=8, seed=0):
    """n_samples DDIM samples of a LatentDiffusion for one prompt: a (n, 3, H, W) CPU tensor in [-1, 1].

    Classifier-free guidance with the empty prompt when scale != 1. A CPU generator makes the
    same seed give the same images on every device.
    """
    from ldm.models.diffusion.ddim import DDIMSampler

    sampler = DDIMSampler(model)
    generator = torch.Generator().manual_seed(seed)
    shape = [model.channels, model.image_size, model.image_size]
    batches = []
    with model.ema_scope():
        for start in range(0, n_samples, batch_size):
            n = min(batch_size, n_samples - start)
            c = model.get_learned_conditioning(n * [prompt])
            uc = model.get_learned_conditioning(n * [""]) if scale != 1.0 else None
            latents, _ = sampler.sample(S=ddim_steps, conditioning=c, batch_size=n, shape=shape, verbose=False,
                                        unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                        eta=eta, generator=generator)
            batches.append(model.decode_first_stage(latents).float().clamp(-1.0, 1.0).cpu())
    return torch.cat(batches)
