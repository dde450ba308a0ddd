"""The few image helpers the datasets and evaluators need, on PIL and numpy (torchvision does not
import beside the project's CPU torch, so nothing here depends on it)."""
import numpy as np
import torch
from PIL import Image, ImageOps

# "linear" is the original's name for bilinear: it used PIL.Image.LINEAR, which Pillow 10 removed.
INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def resample_filter(name):
    """The PIL resampling filter for an interpolation name of the original configs."""
    try:
        return INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown interpolation {name!r}; choose one of {sorted(INTERPOLATIONS)}") from None


def to_rgb(image):
    """Any PIL image as 8-bit RGB, upright.

    Alpha is dropped, as the original's `convert("RGB")` did. 16/32-bit greyscale is scaled down to
    8 bits instead of being clipped (PIL's own conversion saturates everything above 255 to white).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 255.0 if values.max() <= 255 else (65535.0 if values.max() <= 65535 else values.max())
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_rgb(path):
    with Image.open(path) as image:
        return to_rgb(image)


def square_crop(image, place=0.5):
    """-> (the largest square of a PIL image, its (top, left)); `place` in [0, 1] along the long side (0.5:
    centred, with the original's arithmetic)."""
    width, height = image.size
    side = min(width, height)
    left, top = int((width - side) * place), int((height - side) * place)
    return image.crop((left, top, left + side, top + side)), (top, left)


def resize(image, size, interpolation="bicubic"):
    """Resize a PIL image to `size` (an int for a square, or (width, height))."""
    if isinstance(size, int):
        size = (size, size)
    if image.size == tuple(size):
        return image
    return image.resize(tuple(size), resample=resample_filter(interpolation))


def hflip(image):
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_model_range(image):
    """uint8 HWC (PIL or array) -> float32 HWC in [-1, 1], the layout every dataset returns."""
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8_hwc(image):
    """One image in any layout the project produces -> uint8 HWC RGB numpy array.

    Accepts PIL images, uint8 arrays (HWC), float arrays/tensors in [-1, 1] as HWC or CHW
    (datasets give HWC, models and `log_images` give CHW).
    """
    if isinstance(image, Image.Image):
        return np.array(to_rgb(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3:
        raise ValueError(f"Expected one image (HWC or CHW), got an array of shape {image.shape}")
    if image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype == np.uint8:
        return image
    return np.clip((image.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
