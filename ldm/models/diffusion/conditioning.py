"""The one owner of the conditioning: its shapes, how it is cut, stacked and checked, and classifier-free guidance.

A conditioning, as `LatentDiffusion.get_learned_conditioning` returns it and `apply_model` takes it, is one of:
  tensor        (b, n, d) text context (SD v1, SD 2.x, LDM), or whatever a non-text cond stage gives;
  per-layer     (b, layers, n, d): one context per cross-attention layer (XTI, diffusionmodules.layer_contexts);
  list          [tensor, ...]: DiffusionWrapper's form of the above (its c_concat / c_crossattn lists);
  dict          {"c_crossattn": [context], "y": vector} (SDXL: `to_model_conditioning` of the conditioner's
                output), or any dict of DiffusionWrapper's keyword arguments.
DiffusionWrapper (ddpm.py) is the one place that knows which of its inputs each `conditioning_key` feeds the UNet.

SDXL's conditioner reads "txt" and the micro-conditioning keys (Stability's names); the data pipeline gives the
sizes of each image (PersonalizedBase with `size_conditioning: true`), and where it does not (sampling, other
datasets) they default to the generated image's size with no crop, as Stability's sampling does.
"""
import torch

from ldm.modules.diffusionmodules.layer_contexts import broadcast_to_layers

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


# ------------------------------------------------------------------------------------------- SDXL
def conditioner_batch(captions, height, width, batch=None):
    """{"txt": captions, size keys}: taken from `batch` where present, else (height, width) and crop (0, 0)."""
    n = len(captions)
    defaults = {"original_size_as_tuple": (height, width), "crop_coords_top_left": (0, 0),
                "target_size_as_tuple": (height, width)}
    out = {"txt": list(captions)}
    for key in SIZE_KEYS:
        given = batch.get(key) if batch is not None else None
        out[key] = torch.as_tensor(given)[:n] if given is not None else torch.tensor([defaults[key]] * n)
    return out


def to_model_conditioning(output):
    """The conditioner's {"crossattn", "vector"} as DiffusionWrapper's keyword arguments."""
    return {"c_crossattn": [output["crossattn"]], "y": output["vector"]}


# ------------------------------------------------------------------------------------------- batch
def slice_conditioning(c, n):
    """The first `n` samples of a conditioning: a tensor, a list of them, or a dict of either."""
    if isinstance(c, dict):
        return {k: slice_conditioning(v, n) for k, v in c.items()}
    if isinstance(c, list) and c and isinstance(c[0], torch.Tensor):
        return [v[:n] for v in c]
    return c[:n]


def cat_conditioning(uncond, cond):
    """Stack unconditional and conditional inputs along the batch, for tensors, lists and dicts of them."""
    if isinstance(cond, dict):
        return {k: cat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return [cat_conditioning(u, c) for u, c in zip(uncond, cond)]
    if uncond.ndim + 1 == cond.ndim == 4:  # per-layer (XTI) cond: the plain uncond serves every layer
        uncond = broadcast_to_layers(uncond, cond.shape[1])
    return torch.cat([uncond, cond])


def conditioning_batch_size(cond):
    if isinstance(cond, dict):
        cond = next(iter(cond.values()))
    if isinstance(cond, (list, tuple)):
        cond = cond[0]
    return cond.shape[0] if isinstance(cond, torch.Tensor) else len(cond)


def check_batch_size(cond, batch_size):
    """Refuse a conditioning for another number of samples than the batch (every sampler asks this)."""
    if cond is not None and conditioning_batch_size(cond) != batch_size:
        raise ValueError(f"got {conditioning_batch_size(cond)} conditionings for a batch of {batch_size} samples: "
                         "give one prompt (conditioning) per sample")


# ------------------------------------------------------------------------------------------- guidance
def guided_output(model, x, t, cond, uncond=None, scale=1.0):
    """The model's output at (x, t) with classifier-free guidance, in float32:
    out(uncond) + scale * (out(cond) - out(uncond)), or out(cond) alone when there is no uncond or scale is 1.

    Both branches run in one batched model call, as the original: half the kernel launches of two calls.
    """
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond).float()
    out_uncond, out_cond = model.apply_model(
        torch.cat([x] * 2), torch.cat([t] * 2), cat_conditioning(uncond, cond)).float().chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)
