"""SDXL's conditioning inside LatentDiffusion: the batch its GeneralConditioner reads and what the UNet gets.

The conditioner reads "txt" and the micro-conditioning keys (Stability's names); the data pipeline gives the
sizes of each image (PersonalizedBase with `size_conditioning: true`), and where it does not (sampling, other
datasets) they default to the generated image's size with no crop, as Stability's sampling does.
Its output {"crossattn", "vector"} goes to the UNet as context and ADM input `y` (`conditioning_key:
crossattn-adm`), in the dict form `apply_model` passes through: {"c_crossattn": [crossattn], "y": vector}.
"""
import torch

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


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


def slice_conditioning(c, n):
    """The first `n` samples of a conditioning: a tensor, a list of them, or a dict of either."""
    if isinstance(c, dict):
        return {k: slice_conditioning(v, n) for k, v in c.items()}
    if isinstance(c, list) and c and isinstance(c[0], torch.Tensor):
        return [v[:n] for v in c]
    return c[:n]
