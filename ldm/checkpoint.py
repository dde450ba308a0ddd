"""Reading and writing model checkpoints without running code from the file.

`.safetensors` holds only tensors. Pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) go through
`torch.load(weights_only=True)`, whose unpickler builds nothing but tensors and plain containers. Original
SD/LDM checkpoints also pickle a few Lightning and numpy objects; those names are mapped to inert stand-ins
(or to guarded numpy constructors), and any other global makes the load fail before anything runs.

Before anything is unpickled, a file must be a regular file, and a zip container may not declare more
uncompressed bytes than its size makes plausible (a zip bomb is refused, not inflated).
Every file is written atomically: a temporary file in the same folder, flushed to disk, then renamed.
"""
import errno
import io
import os
import pickle
import pickletools
import re
import stat
import tempfile
import zipfile

import numpy as np
import safetensors
import safetensors.torch
import torch
from lightning_fabric.plugins import CheckpointIO
from omegaconf import OmegaConf

from ldm.util import (accepted_parameters, get_obj_from_str, instantiate_from_config, meta_tensor_names,
                      parameters_on_meta)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TMP_PREFIX = ".tmp-"
# torch writes zip records uncompressed; weights barely compress. More than this many times the file's size, plus
# a margin for small files, is a zip bomb.
MAX_INFLATION = 4
INFLATION_MARGIN = 64 * 2 ** 20
# a data.pkl larger than this is not a checkpoint's structure
MAX_PICKLE_BYTES = 512 * 2 ** 20


class CheckpointError(ValueError):
    """A checkpoint file could not be read (missing, truncated, not a checkpoint, wrong kind)."""


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
NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy < 2 pickles the first


# -------------------------------------------------------------------------- guarded numpy and device tensors
def _numpy_dtype(*args):
    # An object dtype could wrap arbitrary objects; numbers are all a checkpoint needs.
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {dtype!r} holds Python objects and is not allowed")
    return dtype


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} is not an allowed global")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by BUILD with its real dtype and bytes
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy array subclass {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, _numpy_dtype(dtype))


def _numpy_tensor_on_cpu(data, dtype, device, requires_grad):
    """What torch < 2 wrote for MPS/XLA tensors, rebuilt on the CPU (the device it names may not exist here)."""
    if not isinstance(data, np.ndarray) or data.dtype.hasobject:
        raise pickle.UnpicklingError("a device tensor must be rebuilt from a numeric numpy array")
    tensor = torch.from_numpy(np.array(data)).to(dtype=dtype)
    tensor.requires_grad = bool(requires_grad)
    return tensor


DEVICE_TENSOR_GLOBAL = b"ctorch._utils\n_rebuild_device_tensor_from_numpy\n"
DEVICE_TENSOR_ON_CPU = b"cldm.checkpoint\n_numpy_tensor_on_cpu\n"


def _numpy_globals():
    pairs = [(_numpy_dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray"),
             (_numpy_tensor_on_cpu, "ldm.checkpoint._numpy_tensor_on_cpu")]
    for module in NUMPY_MODULES:
        pairs += [(_numpy_scalar, f"{module}.scalar"), (_numpy_reconstruct, f"{module}._reconstruct")]
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


# ----------------------------------------------------------------------------------- looking before loading
def pickle_globals(data):
    """The importable names ("module.name") the pickle(s) in `data` would load, read without unpickling.

    Follows GLOBAL/INST and STACK_GLOBAL (whose two strings may come from the memo); stops at the first
    malformed opcode. Legacy torch files hold several pickles in a row: all of them are read.
    """
    stream, names = io.BytesIO(data), []
    for _ in range(8):
        recent, memo = [None, None], {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                pushed = None
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif "UNICODE" in op.name or "STRING" in op.name:
                    pushed = arg
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = recent[-1]
                    continue
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1]
                    continue
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed = memo.get(arg)
                elif op.name == "STACK_GLOBAL" and all(isinstance(s, str) for s in recent):
                    names.append(f"{recent[0]}.{recent[1]}")
                recent = [recent[-1], pushed]
        except Exception:  # the end of the pickles, or bytes that are not one
            break
        if stream.tell() >= len(data):
            break
    return names


def _inert(name, allowed):
    return (name in allowed or name.split(".", 1)[0] in ("torch", "collections", "_codecs")
            or name in ("builtins.set", "builtins.bytearray", "builtins.complex"))


def _check_file(path):
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint not found: {path}") from None
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err.strerror}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"Checkpoint path is a directory, expected a file: {path}")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"Refused {path}: it is not a regular file (a pipe, device or socket); "
                              "give the path of a checkpoint file.")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a run killed while copying it? Use an earlier "
                              "checkpoint.")
    return path


def _zip_pickle(path):
    """-> (name of data.pkl, its bytes) of a torch zip checkpoint, after bounding what the zip declares."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            declared = sum(info.file_size for info in infos)
            if declared > MAX_INFLATION * size + INFLATION_MARGIN:
                raise CheckpointSecurityError(
                    f"Refused {path}: its {size / 2 ** 20:.1f} MB declare {declared / 2 ** 30:.1f} GB once "
                    "unpacked (a zip bomb, not a checkpoint torch wrote). Nothing was unpacked.")
            pickles = [i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
            if not pickles:
                return None, b""
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise CheckpointSecurityError(f"Refused {path}: its data.pkl declares {pickles[0].file_size} bytes")
            return pickles[0].filename, archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"Could not read checkpoint {path} (a damaged zip container: {err}); the file is "
                              "truncated or not a checkpoint.") from None


def _torch_reason(err):
    """torch's own explanation, without its advice to load with weights_only=False (never right here)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split("Check the documentation of torch.load", 1)[0]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line and "In PyTorch 2.6" not in line]
    reason = " ".join(lines)
    return reason[:300] if reason else type(err).__name__


def _sniff(head):
    """What the first bytes of a file look like, in a few words."""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x80"):
        return "a pickle with instructions outside the safe subset, or a damaged one"
    sample = head[:512]
    if sample and all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return "a text file"
    return "unrecognised binary data"


def _refuse(path, what):
    return CheckpointSecurityError(
        f"Refused to load {path}: it would import {what}, which is code, not data. Nothing from the file was "
        "executed. If you made this file, re-export it from the run that wrote it (this project's checkpoints "
        "and embeddings_gs-*.pt hold plain tensors); otherwise ask its author for a .safetensors version.")


def load_checkpoint(path, map_location="cpu", extra_stand_ins=(), mmap=False):
    """Load a checkpoint file as plain Python data (dict of tensors / containers) without executing its code.

    `extra_stand_ins` names further pickled classes to accept as inert `PickledObject` stand-ins.
    `mmap`: a torch zip checkpoint's tensors are mapped from the file instead of read into memory (a tensor
    costs memory only once touched, and none if a model takes it as it is).
    Always `weights_only=True`, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
    """
    path = _check_file(path)
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(path, device=str(map_location))
        except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"Could not read safetensors checkpoint {path} (truncated or not safetensors: "
                                  f"{err})") from None
    source = path
    if zipfile.is_zipfile(path):
        pkl_name, pkl = _zip_pickle(path)
        if DEVICE_TENSOR_GLOBAL in pkl:  # torch < 2 wrote MPS tensors through numpy, for a device we may not have
            source = _rewritten_zip(path, pkl_name, pkl.replace(DEVICE_TENSOR_GLOBAL, DEVICE_TENSOR_ON_CPU))
    else:
        pkl = None  # a legacy or bare pickle: read only to explain a refusal
    allowed = _allow_list(extra_stand_ins)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location=map_location, weights_only=True,
                              mmap=mmap and source is path and pkl is not None)
    except pickle.UnpicklingError as err:
        if pkl is None:
            with open(path, "rb") as f:
                pkl = f.read(MAX_PICKLE_BYTES)
        names = {name for _, name in allowed}
        offending = [n for n in pickle_globals(pkl) if not _inert(n, names)]
        named = re.search(r"GLOBAL (\S+)", str(err))
        if offending or named:
            raise _refuse(path, offending[0] if offending else named.group(1)) from None
        if "not allowed" in str(err) or "not an allowed" in str(err):  # one of the guards above
            raise CheckpointSecurityError(f"Refused to load {path}: {_torch_reason(err)}. Nothing from the file "
                                          "was executed.") from None
        raise CheckpointError(
            f"Could not read {path}: it is {_sniff(pkl)}, not a checkpoint torch wrote (the safe loader stopped at "
            f"{_torch_reason(err)}; nothing from the file was executed).") from None
    except (RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
            zipfile.BadZipFile, OSError, MemoryError) as err:
        if pkl is None:  # not a zip: say what the file looks like
            with open(path, "rb") as f:
                what = f"it is {_sniff(f.read(512))}; "
        else:
            what = "a damaged zip container; "
        raise CheckpointError(f"Could not read checkpoint {path} ({what}truncated or not a checkpoint: "
                              f"{_torch_reason(err)})") from None


def _rewritten_zip(path, pkl_name, pkl):
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pkl if info.filename == pkl_name else src.read(info))
    out.seek(0)
    return out


# ------------------------------------------------------------------------------------------- what a file is
def describe_checkpoint(data):
    """A few words on what a loaded checkpoint looks like, for error messages."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not a dict of weights"
    if "string_to_param" in data or "emb_params" in data or "clip_l" in data:
        return "an embedding file (learned vectors, for --embedding_path / --embedding_manager_ckpt)"
    sd = data.get("state_dict", data)
    if not isinstance(sd, dict):
        return "a checkpoint without a state dict"
    keys = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return "a file without tensors"
    if all(k.startswith("embedding_manager.") for k in keys):
        return "a textual-inversion run checkpoint (learned vectors only; resume it with main.py -r)"
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        return "an SDXL checkpoint"
    if has("cond_stage_model.model."):
        return "an SD 2.x checkpoint (OpenCLIP text encoder)"
    if has("model.diffusion_model."):
        emb = sd.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        width = f", text width {emb.shape[-1]}" if isinstance(emb, torch.Tensor) else ""
        return f"a latent diffusion checkpoint ({len(keys)} tensors{width})"
    if has("encoder.") and has("decoder."):
        return "an autoencoder (first stage) checkpoint"
    if has("down_blocks.") or has("text_model."):
        return "a diffusers/transformers module, not the official layout"
    prefixes = sorted({k.split(".", 1)[0] for k in keys})
    return f"a state dict of {len(keys)} tensors under {', '.join(prefixes[:5])}"


def load_state_dict(path, map_location="cpu", mmap=False):
    """A flat {name: tensor} state dict from a checkpoint, unwrapping the Lightning {"state_dict": ...} layer."""
    return _state_dict(load_checkpoint(path, map_location=map_location, mmap=mmap), path)


def _state_dict(ckpt, path):
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _first(keys, n=3):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_weights(module, sd, path, optional=()):
    """Raise CheckpointError unless `sd` holds every weight `module` needs, in the right shapes.

    Keys starting with a prefix in `optional` may be absent (e.g. the embedding manager, learned separately).
    -> (keys absent by design, keys of the file the module does not use).
    """
    expected = module.state_dict()
    wanted = [k for k in expected if not k.startswith(tuple(optional))]
    what = type(module).__name__
    if wanted and not any(k in sd for k in wanted):
        raise CheckpointError(
            f"{path} does not fit {what}: it looks like {describe_checkpoint(sd)}, and none of its keys are the "
            f"{len(wanted)} this model needs (e.g. {_first(wanted, 2)}). Give the weights of the model the config "
            "describes.")
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} of the {len(wanted)} weights {what} needs ({_first(missing)}); it looks "
            f"like {describe_checkpoint(sd)}. Check that the checkpoint matches the config.")
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path} is for another model: {len(wrong)} weights have other shapes, e.g. {k} is "
            f"{tuple(sd[k].shape)} in the file and {tuple(expected[k].shape)} in the config. Give the checkpoint "
            "of the model the config describes (or the config of this checkpoint).")
    absent = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    return absent, unexpected


def load_weights(module, path, ignore_keys=(), optional=(), verbose=True):
    """Fill `module` from the weights file `path`, strictly: every weight it needs must be in the file.

    Keys starting with any of `ignore_keys` are left out of the file (the module keeps its own values for them);
    module keys starting with any of `optional` may be absent (named in the report).
    Returns (absent optional keys, unexpected keys).
    """
    raw = load_checkpoint(path, mmap=True)
    if isinstance(raw, dict) and ("string_to_param" in raw or "emb_params" in raw):
        raise CheckpointError(f"{path} is {describe_checkpoint(raw)}, not model weights: give it with "
                              "--embedding_path (sampling) or --embedding_manager_ckpt (training).")
    sd = _state_dict(raw, path)
    del raw
    ignored = [k for k in sd if k.startswith(tuple(ignore_keys))]
    for k in ignored:
        del sd[k]
    optional = tuple(optional) + tuple(ignore_keys)  # the module keeps its own values for ignored keys
    absent, unexpected = check_weights(module, sd, path, optional)
    if meta_tensor_names(module):
        _assign_weights(module, sd, path)
    else:
        module.load_state_dict(sd, strict=False)
    if verbose:
        print(f"Restored {type(module).__name__} from {path}: all {len(sd) - len(unexpected)} weights it needs"
              + (f"; not in the file, as expected: {len(absent)} under {', '.join(optional)}" if absent else "")
              + (f"; unused: {len(unexpected)} ({_first(unexpected, 2)})" if unexpected else "")
              + (f"; ignored: {len(ignored)}" if ignored else ""))
    return absent, unexpected


def _assign_weights(module, sd, path):
    """Fill a module built with `parameters_on_meta` by taking the file's tensors as its own: a tensor already
    in the module's dtype is not copied at all; one in another dtype (fp16 files) is cast once, and its file
    copy is let go before the next, so memory never holds the weights twice."""
    expected = module.state_dict()
    casts = {k: expected[k].dtype for k in sd if k in expected and sd[k].dtype != expected[k].dtype}
    del expected
    if casts:
        _cast_from_file(path, sd, casts)
    with parameters_on_meta(enabled=False):  # the file's tensors, even inside a constructor building on meta
        module.load_state_dict(sd, strict=False, assign=True)
    left = meta_tensor_names(module)
    if left:
        raise CheckpointError(f"{path} leaves {len(left)} weights of {type(module).__name__} unset ({_first(left)}), "
                              "and the model was built to take them from the file. Give the weights of the "
                              "model the config describes.")


def _cast_from_file(path, sd, dtypes):
    """Replace `sd[k]` by the file's tensor cast to `dtypes[k]`, one tensor at a time, each read into memory of its
    own and freed once cast. (Cast from a mapping of the whole file, the file's pages would stay resident until
    the last tensor is done: the weights held twice after all.)"""
    if os.fspath(path).endswith(".safetensors"):
        with safetensors.safe_open(path, framework="pt", backend="pread") as f:
            for k, dtype in dtypes.items():
                sd[k] = f.get_tensor(k).to(dtype)
        return
    if not zipfile.is_zipfile(path):  # a legacy pickle, read into memory already: cast it where it is
        for k, dtype in dtypes.items():
            sd[k] = sd[k].to(dtype)
        return
    unmapped = load_state_dict(path)
    for k, dtype in dtypes.items():
        sd[k] = unmapped.pop(k).to(dtype)


def load_model_from_config(config, ckpt=None, device="cpu", verbose=True):
    """Build `config.model` and fill it from `ckpt` (the learned embeddings come from their own file).

    No weight the file holds is initialised at random first or held twice: a diffusion model takes `ckpt` as its
    `ckpt_path` (its constructor builds the weights empty, fills them, then builds the embedding manager from the
    loaded text encoder); any other module is built empty here and filled the same way.
    """
    if isinstance(config, (str, os.PathLike)):
        config = OmegaConf.load(config)
    if ckpt is None:
        return instantiate_from_config(config.model).to(device).eval()
    target = get_obj_from_str(config.model.target)
    if hasattr(target, "init_from_ckpt") and "ckpt_path" in (accepted_parameters(target) or ()):
        model = instantiate_from_config(OmegaConf.merge(config.model, {"params": {"ckpt_path": os.fspath(ckpt)}}))
        _load_manager_weights(model, ckpt)
    else:
        with parameters_on_meta():
            model = instantiate_from_config(config.model)
        optional = tuple(getattr(model, "optional_weight_keys", tuple)())
        load_weights(model, ckpt, optional=optional, verbose=verbose)
    return model.to(device).eval()


def _load_manager_weights(model, path, prefix="embedding_manager."):
    """Vectors the file holds for the embedding manager (a run trained with unfreeze_model saves the whole model)
    replace those it was built with; a base model's file holds none."""
    manager = getattr(model, "embedding_manager", None)
    if manager is None:
        return
    sd = {k[len(prefix):]: v for k, v in load_state_dict(path, mmap=True).items() if k.startswith(prefix)}
    if sd:
        check_weights(manager, sd, path, optional=("",))
        manager.load_state_dict(sd, strict=False)


# ------------------------------------------------------------------------------------------------- writing
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


def _fsync(path, directory=False):
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call `write(tmp_path)`, flush it to disk, then rename it over `path`: a reader (or a run killed at any
    moment) sees the old file or the new one, never a half-written one. The temporary file is in the same
    folder, so the rename never becomes a copy across filesystems."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        try:
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
        except Exception as err:
            if _disk_full(directory, err):  # torch and safetensors report it in their own words
                raise OSError(errno.ENOSPC, "No space left on device", path) from err
            raise
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync(directory, directory=True)


def _disk_full(directory, err):
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(err):
        return True
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return stats.f_bavail * stats.f_frsize < 64 * 1024


def remove_stray_temporaries(directory):
    """Delete the temporary files of writes a killed run left behind in `directory`; returns their names."""
    if not os.path.isdir(directory):
        return []
    stray = [name for name in os.listdir(directory) if name.startswith(TMP_PREFIX)]
    for name in stray:
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass
    return stray


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


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint reads and writes, through this module: resume never unpickles code (whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says) and every checkpoint is written atomically in its own folder."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint(path, map_location="cpu" if map_location is None else map_location)

    def remove_checkpoint(self, path):
        if os.path.isfile(path):
            os.remove(path)
