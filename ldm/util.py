"""Small helpers shared by every component; `instantiate_from_config` makes each one swappable from YAML."""
import importlib
from inspect import isfunction

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def get_obj_from_str(string, reload=False):
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config, **kwargs):
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"Expected key `target` to instantiate, got: {dict(config) if hasattr(config, 'keys') else config}")
    return get_obj_from_str(config["target"])(**config.get("params", dict()), **kwargs)


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if isfunction(d) else d


def ismap(x):
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x):
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def count_params(model, verbose=False):
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def load_font(size):
    # The original loaded data/DejaVuSans.ttf from a fixed path; fall back to PIL's bundled font.
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size=size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def log_txt_as_img(wh, xc, size=10):
    """Render each caption in `xc` onto a white image of size `wh`; returns a [-1, 1] tensor (b, 3, h, w)."""
    w, h = wh
    font = load_font(size)
    chars_per_line = max(1, int(40 * (w / 256)))
    out = []
    for text in xc:
        img = Image.new("RGB", wh, color="white")
        lines = "\n".join(text[i:i + chars_per_line] for i in range(0, len(text), chars_per_line))
        ImageDraw.Draw(img).text((0, 0), lines, fill="black", font=font)
        out.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out))


def make_grid(images, nrow=8, padding=2, pad_value=0.0):
    """Tile a (b, c, h, w) tensor into one (c, H, W) image, like torchvision's make_grid (which we do not depend on)."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = images.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def to_pil(image):
    """(c, h, w) tensor in [-1, 1] -> PIL RGB image."""
    arr = ((image.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())
