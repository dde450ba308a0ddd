"""The few image helpers the datasets and evaluators need, on PIL and numpy (torchvision does not
import beside the project's CPU torch, so nothing here depends on it)."""
import warnings

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps

from ldm.util import open_input_file

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


WHITE = (255, 255, 255)
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# PIL's Image.reduce takes these modes; others (P, 1, I;16) are converted first
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")


def background_colour(value):
    """An RGB tuple from a colour name ("white"), "#rrggbb", or three numbers from 0 to 255."""
    try:
        colour = ImageColor.getrgb(value)[:3] if isinstance(value, str) else tuple(int(v) for v in value)
    except (ValueError, TypeError):
        colour = ()
    if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
        raise ValueError(f"background {value!r}: give a colour name such as 'white', '#rrggbb', or three numbers "
                         "from 0 to 255")
    return colour


def has_alpha(image):
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image, background=WHITE):
    """Any PIL image as 8-bit RGB, upright.

    Transparent pixels are composited onto `background` (the original's `convert("RGB")` dropped the alpha,
    showing whatever colour the transparent pixels held, usually black). 16/32-bit greyscale is scaled down to
    8 bits instead of being clipped (PIL's own conversion saturates everything above 255 to white).
    """
    image = ImageOps.exif_transpose(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, tuple(background) + (255,)), rgba)
    elif image.mode in HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float32)
        peak = 255.0 if values.max() <= 255 else (65535.0 if values.max() <= 65535 else float(values.max()))
        image = Image.fromarray(np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def conversion_notes(image, background):
    """One line for each way the decoded RGB image differs from what the file holds."""
    notes = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"has {frames} frames (animated): the first frame is used")
    if image.mode == "CMYK":
        notes.append("is CMYK: converted to RGB without its colour profile (colours may shift; save it as RGB "
                     "for exact colours)")
    if image.mode in HIGH_DEPTH_MODES or any(";16" in str(tile.args) for tile in image.tile):
        notes.append("has 16 or more bits per channel: scaled to 8 bits")
    if has_alpha(image):
        notes.append(f"has transparency: composited onto the background colour {tuple(background)} "
                     "(`background:` in the data params)")
    return notes


def reduced_while_decoding(image, min_side):
    """`image` decoded at the smallest size whose shorter side is still at least `min_side` pixels: JPEG's
    decoder scales by 1/2, 1/4 or 1/8 itself (draft); other formats are shrunk by a whole factor right after
    decoding, before any conversion copies them, so a huge image costs one full-size buffer, not several."""
    if image.format == "JPEG":
        image.draft(image.mode, (min_side, min_side))
    factor = min(image.size) // min_side
    if factor < 2:
        return image
    if image.mode not in REDUCIBLE_MODES:
        image = image.convert("RGBA" if has_alpha(image) else "RGB")
    return image.reduce(factor)


def load_rgb(path, background=WHITE, min_side=None):
    """The image file at `path` as 8-bit RGB (to_rgb), warning once for each conversion that changes what it
    shows (conversion_notes). With `min_side`, an image larger than needed is reduced while decoding, never
    below `min_side` on its shorter side; `info["original_size"]` keeps the file's (width, height).

    Only a regular file is opened (a FIFO would block forever): anything else is an InputFileError naming it.
    """
    with open_input_file(path, "image") as f, Image.open(f) as image:
        original_size = image.size
        notes = conversion_notes(image, background)
        if min_side:
            image = reduced_while_decoding(image, min_side)
        rgb = to_rgb(image, background)
    for note in notes:
        warnings.warn(f"{path} {note}")
    rgb.info["original_size"] = original_size
    return rgb


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
