"""Reading and writing model checkpoints without running code from the file.

`.safetensors` holds only tensors. Pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) go through
`torch.load(weights_only=True)`, whose unpickler builds nothing but tensors and plain containers. Original
SD/LDM checkpoints also pickle a few Lightning and numpy objects; those names are mapped to inert stand-ins
(or to guarded numpy constructors), and any other global makes the load fail before anything runs.
"""
import os
import pickle
import re
import tempfile
import zipfile

import numpy as np
import safetensors
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint file could not be read (missing, truncated, not a checkpoint)."""


class CheckpointSecurityError(CheckpointError):
    """A pickled checkpoint references a global outside the allow-list; the load was refused."""


class PickledObject:
    """Inert stand-in for an object the checkpoint pickled: keeps the pickled arguments and state as data.

    No method of the original class is ever called; the stand-in only records what the pickle held.
    """

    pickled_name = None

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stand-in for pickled {self.pickled_name}>"


def stand_in(qualified_name):
    """A distinct stand-in class per pickled name, so classes used as dict keys stay distinct."""
    return type(qualified_name.rsplit(".", 1)[-1], (PickledObject,), {"pickled_name": qualified_name})


# Lightning objects found in SD/LDM training checkpoints (e.g. "callbacks": {ModelCheckpoint: {...}}).
LIGHTNING_STAND_INS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.lr_monitor.LearningRateMonitor",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)


def _numpy_scalar(dtype, data):
    # An object-dtype scalar could wrap arbitrary objects; numbers are all a checkpoint needs.
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} is not an allowed global")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_globals():
    pairs = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs.append((_numpy_scalar, f"{module}.scalar"))
    pairs.append((np.dtype, "numpy.dtype"))
    # Unpickling a dtype ends in BUILD on its concrete class (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    for name in getattr(dtypes, "__all__", ()):
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            pairs.append((cls, f"numpy.dtypes.{name}"))
    return pairs


def _allow_list(extra_stand_ins=()):
    names = tuple(LIGHTNING_STAND_INS) + tuple(extra_stand_ins)
    return [(stand_in(name), name) for name in names] + _numpy_globals()


def _check_file(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"Checkpoint path is a directory, expected a file: {path}")
    return path


def load_checkpoint(path, map_location="cpu", extra_stand_ins=()):
    """Load a checkpoint file as plain Python data (dict of tensors / containers) without executing its code.

    `extra_stand_ins` names further pickled classes to accept as inert `PickledObject` stand-ins.
    """
    path = _check_file(path)
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(path, device=str(map_location))
        except (safetensors.SafetensorError, OSError) as err:
            raise CheckpointError(f"Could not read safetensors checkpoint {path}: {err}") from err
    try:
        with torch.serialization.safe_globals(_allow_list(extra_stand_ins)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Unsupported operand" in message or "invalid load key" in message:
            raise CheckpointError(f"Could not read checkpoint {path} (corrupt or not a checkpoint): {err}") from err
        offending = re.search(r"GLOBAL (\S+)", message)
        what = offending.group(1) if offending else "an object outside the allow-list"
        raise CheckpointSecurityError(
            f"Refused to load {path}: it pickles {what}, which is not an allowed global. "
            "Nothing from the file was executed. If you trust the file, re-save its tensors as .safetensors."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"Could not read checkpoint {path} (truncated or not a checkpoint?): {err}") from err


def load_state_dict(path, map_location="cpu"):
    """A flat {name: tensor} state dict from a checkpoint, unwrapping the Lightning {"state_dict": ...} layer."""
    ckpt = load_checkpoint(path, map_location=map_location)
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def load_weights(module, path, ignore_keys=(), strict=False, verbose=True):
    """Fill `module` from the weights file `path` (keys starting with any of `ignore_keys` left out) and report
    the missing and unexpected keys; returns (missing, unexpected)."""
    sd = load_state_dict(path)
    ignored = [k for k in sd if any(k.startswith(prefix) for prefix in ignore_keys)]
    for k in ignored:
        del sd[k]
    missing, unexpected = module.load_state_dict(sd, strict=strict)
    print(f"Restored {type(module).__name__} from {path}: missing keys: {len(missing)}, unexpected keys: "
          f"{len(unexpected)}" + (f", ignored keys: {len(ignored)}" if ignored else ""))
    if verbose:
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                print(f"  first {label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return missing, unexpected


def load_model_from_config(config, ckpt=None, device="cpu", verbose=True, strict=False):
    """Build `config.model` and fill it from `ckpt`; returns the model in eval mode on `device`."""
    if isinstance(config, (str, os.PathLike)):
        config = OmegaConf.load(config)
    model = instantiate_from_config(config.model)
    if ckpt is not None:
        load_weights(model, ckpt, strict=strict, verbose=verbose)
    return model.to(device).eval()


def _safetensors_ready(state_dict):
    # safetensors refuses non-contiguous tensors and tensors sharing storage: give each its own copy.
    seen, out = set(), {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        shared = ptr is not None and ptr in seen
        if ptr is not None:
            seen.add(ptr)
        out[key] = value.clone().contiguous() if shared or not value.is_contiguous() else value
    return out


def atomic_write(path, write):
    """Call `write(tmp_path)` then move the file into place, so readers never see a half-written file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_state_dict(state_dict, path, metadata=None):
    """Write a state dict atomically: `.safetensors` as is, anything else as torch.save({"state_dict": ...})."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        tensors = _safetensors_ready(state_dict)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
    else:
        payload = {"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
        if metadata:
            payload["metadata"] = dict(metadata)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
