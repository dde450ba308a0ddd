"""Small helpers shared by every component; `instantiate_from_config` makes each one swappable from YAML."""
import difflib
import importlib
import inspect
import os
import stat
from contextlib import contextmanager
from inspect import isfunction

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


class ConfigError(ValueError):
    """A config names a target that does not exist, or passes it a parameter it does not take."""


class InputFileError(ValueError):
    """An input file (image, prompt file) that is missing, not a regular file, or too large."""


def open_input_file(path, what, max_bytes=None):
    """`path` opened for binary reading, after checking it is a regular file of at most `max_bytes`.

    Opened without blocking, so a FIFO (which would wait forever for a writer) or a device is refused instead
    of hanging; `what` names the file in the one-line InputFileError ("prompt file", "image").
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputFileError(f"{what} {path} not found") from None
    except OSError as err:
        raise InputFileError(f"cannot read {what} {path}: {err.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = "is a folder, not a file"
    elif not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file but a pipe, device or socket: give the path of a file"
    elif max_bytes is not None and info.st_size > max_bytes:
        problem = f"is {info.st_size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.0f} MiB a {what} may be"
    if problem:
        os.close(fd)
        raise InputFileError(f"{what} {path} {problem}")
    return os.fdopen(fd, "rb")


def read_text_file(path, what, max_bytes):
    """The UTF-8 text of the regular file `path` (open_input_file); InputFileError naming it otherwise."""
    with open_input_file(path, what, max_bytes) as f:
        data = f.read(max_bytes + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(f"{what} {path} is not UTF-8 text (byte {err.start} is {data[err.start]:#04x}): "
                             "write it as UTF-8 text") from None


def get_obj_from_str(string):
    module, _, name = string.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"Config target {string!r} cannot be imported ({err}): check its spelling.") from None


def accepted_parameters(target):
    """Names of the keyword parameters `target` (a class or function) takes, or None when it takes any.

    A constructor that passes **kwargs on to its base class accepts its base's parameters too; the walk
    stops at the first constructor without **kwargs, or gives up (None) at one outside this project.
    """
    if not inspect.isclass(target):
        functions = [target]
    else:
        functions = [cls.__dict__["__init__"] for cls in target.__mro__ if "__init__" in cls.__dict__]
    names = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
        if not getattr(function, "__module__", "").startswith(("ldm.", "main", "evaluation.")):
            return None
    return None


def named_parameters(function):
    """The keyword parameters `function` names, ignoring any **kwargs it takes."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_parameters(target, given, what, accepted=None):
    """Raise ConfigError naming the first key of `given` that `target` does not take (or that is not in
    `accepted`, when given), and the closest valid one."""
    accepted = accepted_parameters(target) if accepted is None else accepted
    if accepted is None:
        return
    unknown = [key for key in given if key not in accepted]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(sorted(accepted))}"
        raise ConfigError(f"Unknown config key `{key}` for {what}: {hint}")


def instantiate_from_config(config, **kwargs):
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise ConfigError(f"Expected key `target` to instantiate, got: "
                          f"{dict(config) if hasattr(config, 'keys') else config}")
    target = get_obj_from_str(config["target"])
    params = config.get("params", dict()) or {}
    check_parameters(target, list(params) + list(kwargs), config["target"])
    return target(**params, **kwargs)


_REGISTER_PARAMETER = torch.nn.Module.register_parameter


def _register_on_meta(module, name, param):
    if param is not None and not param.is_meta:
        param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _REGISTER_PARAMETER(module, name, param)


@contextmanager
def parameters_on_meta(enabled=True):
    """Build modules whose parameters are placeholders on the meta device: nothing is allocated or randomly
    initialised, for weights a checkpoint then fills by assignment. Buffers stay real (the noise schedule,
    position ids): they are small, and a weights file need not hold them. `enabled=False` suspends it (to assign
    a file's tensors inside a constructor that runs under it)."""
    previous = torch.nn.Module.register_parameter
    torch.nn.Module.register_parameter = _register_on_meta if enabled else _REGISTER_PARAMETER
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = previous


def meta_tensor_names(module):
    """Names of `module`'s parameters and buffers that are still placeholders on the meta device."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, tensor in tensors if tensor.is_meta]


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if isfunction(d) else d


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


def disabled_train(self, mode=True):
    """Replaces `.train` on frozen modules so that Lightning cannot switch them back to training mode."""
    return self


def freeze(module):
    """Freeze `module` for good: eval mode that `.train()` cannot undo, and no gradients. Returns it."""
    module.eval()  # before train() is disabled: eval() calls it
    module.train = disabled_train.__get__(module)
    for p in module.parameters():
        p.requires_grad = False
    return module


def model_dtype(model):
    """The dtype the model computes in: that of its first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
