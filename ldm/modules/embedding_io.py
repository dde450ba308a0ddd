"""The one place that knows the file formats of learned embeddings.

Formats read (recognised by content, the extension only picks the container):
  official   {"string_to_token": {s: tensor(id)}, "string_to_param": {s: [n, d]}, "name", "step"}; files written
             by the original code pickle an nn.ParameterDict, read here through an inert stand-in.
  a1111      AUTOMATIC1111 .pt: one term under string_to_param["*"], plus name, step, sd_checkpoint(_name).
  a1111-safetensors / kohya   {"emb_params": [n, d]} in .safetensors (kohya also in .pt).
  diffusers  {placeholder_token: [d] or [n, d]} in learned_embeds.safetensors / .bin.
Vectors always come back as float32 [n, d].
"""
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ldm.checkpoint import PickledObject, atomic_write, load_checkpoint

FORMATS = ("official", "a1111", "a1111-safetensors", "diffusers", "kohya")
ONE_TERM_FORMATS = ("a1111", "a1111-safetensors", "diffusers", "kohya")
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"
A1111_STAR_TOKEN = 265  # CLIP id of "*", which AUTOMATIC1111 writes as the (unused) placeholder token


@dataclass
class EmbeddingFile:
    vectors: dict  # concept string -> float32 Tensor[n, d]
    tokens: dict  # concept string -> token id, or None where the format does not store one
    name: str = None
    step: int = None
    format: str = "official"


def _plain_mapping(value):
    """string_to_param as a plain dict: unwraps the original's pickled nn.ParameterDict stand-in."""
    if isinstance(value, PickledObject):
        state = value.state or {}
        params = state.get("_parameters", {})
        return {key: params[key] for key in state.get("_keys", params) if key in params}
    return dict(value)


def _as_matrix(tensor, path, key):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{path}: embedding {key!r} should be a [d] or [n, d] tensor, got {shape}")
    tensor = tensor.detach().to(torch.float32)
    if not torch.isfinite(tensor).all():  # it would sample black images without a word
        raise ValueError(f"{path}: embedding {key!r} holds NaN or infinite values (training diverged?); use an "
                         "earlier embeddings_gs-*.pt of the run")
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


def _token_id(value):
    if value is None:
        return None
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _optional_int(value):
    return None if value in (None, "", "None") else int(value)


def _safetensors_metadata(path):
    if not path.endswith(".safetensors"):
        return {}
    with safetensors.safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_embedding_file(path):
    """Read any supported embedding file; see the module docstring for the layouts."""
    path = os.fspath(path)
    data = load_checkpoint(path, extra_stand_ins=(PARAMETER_DICT,))
    meta = _safetensors_metadata(path)
    stem = Path(path).stem
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an embedding file (holds a {type(data).__name__}, expected a dict)")
    keys = sorted(map(str, data))
    if "clip_l" in data or "clip_g" in data:
        raise ValueError(
            f"{path} is an SDXL embedding (keys {keys}); its clip_l/clip_g vectors do not fit the single "
            "SD1 CLIP text encoder this code uses."
        )
    if "string_to_param" in data:
        params = _plain_mapping(data["string_to_param"])
        step = _optional_int(data.get("step"))
        if "sd_checkpoint" in data or "sd_checkpoint_name" in data:
            if len(params) != 1:
                raise ValueError(f"{path}: an AUTOMATIC1111 file holds one term, found {sorted(params)}")
            name = data.get("name") or stem
            return EmbeddingFile({name: _as_matrix(next(iter(params.values())), path, name)},
                                 {name: None}, name, step, "a1111")
        tokens = _plain_mapping(data.get("string_to_token", {}))
        vectors = {s: _as_matrix(v, path, s) for s, v in params.items()}
        return EmbeddingFile(vectors, {s: _token_id(tokens.get(s)) for s in vectors},
                             data.get("name"), step, "official")
    if set(data) == {"emb_params"}:
        name = meta.get("name") or stem
        fmt = "a1111-safetensors" if meta.get("format") == "a1111-safetensors" else "kohya"
        return EmbeddingFile({name: _as_matrix(data["emb_params"], path, name)}, {name: None},
                             name, _optional_int(meta.get("step")), fmt)
    looks_like_diffusers = data and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim in (1, 2) for k, v in data.items()
    )
    if looks_like_diffusers:
        vectors = {k: _as_matrix(v, path, k) for k, v in data.items()}
        return EmbeddingFile(vectors, {k: None for k in vectors}, meta.get("name"),
                             _optional_int(meta.get("step")), "diffusers")
    raise ValueError(f"{path}: unrecognised embedding layout; keys found: {keys}")


def _plain_tensor(tensor):
    # clone: saving a view would pickle the whole storage it points into.
    return tensor.detach().cpu().clone().contiguous()


def save_embedding_file(path, vectors, tokens=None, name=None, step=None, fmt="official"):
    """Write `vectors` ({concept: [n, d] or [d]}) atomically in format `fmt`, plain tensors only.

    `tokens` ({concept: id}) is needed for the official format. One-term formats refuse several concepts.
    """
    path = os.fspath(path)
    if fmt not in FORMATS:
        raise ValueError(f"Unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    vectors = {key: _plain_tensor(_as_matrix(value, path, key)) for key, value in vectors.items()}
    if not vectors:
        raise ValueError(f"Nothing to save to {path}: no embedding vectors given")
    if fmt in ONE_TERM_FORMATS and len(vectors) != 1:
        raise ValueError(
            f"The {fmt} format holds one concept per file, got {len(vectors)} ({', '.join(vectors)}): "
            "save each concept to its own file, or use the official format."
        )
    key, vec = next(iter(vectors.items()))
    step = None if step is None else int(step)
    metadata = {k: str(v) for k, v in (("format", fmt), ("name", name), ("step", step)) if v is not None}

    if fmt == "official":
        tokens = tokens or {}
        missing = [s for s in vectors if tokens.get(s) is None]
        if missing:
            raise ValueError(f"The official format stores each placeholder's token id; none given for {missing}")
        payload = {
            "string_to_token": {s: torch.tensor(_token_id(tokens[s])) for s in vectors},
            "string_to_param": vectors,
            "name": name,
            "step": step,
        }
    elif fmt == "a1111":
        payload = {
            "string_to_token": {"*": A1111_STAR_TOKEN},
            "string_to_param": {"*": vec},
            "name": name or key,
            "step": step,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
    elif fmt == "diffusers":
        payload = {key: vec}
    else:  # a1111-safetensors, kohya
        payload = {"emb_params": vec}

    if fmt == "a1111-safetensors" and not path.endswith(".safetensors"):
        raise ValueError(f"The a1111-safetensors format needs a .safetensors path, got {path}")
    if path.endswith(".safetensors"):
        if fmt in ("official", "a1111"):
            raise ValueError(f"The {fmt} format is a pickled .pt file; {path} ends in .safetensors")
        atomic_write(path, lambda tmp: safetensors.torch.save_file(payload, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


@functools.lru_cache(maxsize=None)
def single_token_lookup(tokenizer="clip"):
    """A function string -> token id, or None when the string is not exactly one token.

    Formats other than the official one do not store token ids; this recovers them for the text encoder in use
    ("clip" for Stable Diffusion, "bert" for the LDM-1.4B model).
    """
    if tokenizer == "clip":
        from ldm.modules.encoders.clip_tokenizer import load_clip_tokenizer
        tok = load_clip_tokenizer()
    elif tokenizer == "bert":
        from ldm.modules.encoders.modules import BERTTokenizer
        tok = BERTTokenizer().tokenizer
    else:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}; use 'clip' or 'bert'")

    def lookup(string):
        ids = tok(string, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    return lookup
