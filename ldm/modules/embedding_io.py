"""The one place that knows the file formats of learned embeddings.

Formats read (recognised by content, the extension only picks the container):
  official   {"string_to_token": {s: tensor(id)}, "string_to_param": {s: [n, d]}, "name", "step"}; files written
             by the original code pickle an nn.ParameterDict, read here through an inert stand-in.
  a1111      AUTOMATIC1111 .pt: one term under string_to_param["*"], plus name, step, sd_checkpoint(_name).
  a1111-png  the same dict as JSON in a PNG (text chunk or pixels; see ldm.modules.embedding_png).
  a1111-safetensors / kohya   {"emb_params": [n, d]} in .safetensors (kohya also in .pt).
  diffusers  {placeholder_token: [d] or [n, d]} in learned_embeds.safetensors / .bin.
SDXL files hold one vector set per text encoder, keyed by the encoder's `embedding_key` (ENCODER_KEYS):
  a1111-safetensors / kohya / a1111-png   {"clip_l": [n, 768], "clip_g": [n, 1280]} (one concept), as
             AUTOMATIC1111 and kohya write them; diffusers loads this file too, one key per text encoder.
  official   the project's own: {"string_to_token": {s: id}, "string_to_param": {"clip_l": {s: [n, 768]},
             "clip_g": {s: [n, 1280]}}, "name", "step"}, several concepts per file like SD v1's.
XTI (extended textual inversion, one vector set per cross-attention layer) files are read by `read_xti_file`
and written by `save_xti_file` (the official layout with a leading layers axis, and kohya's {layer: [n, d]});
every one-set reader refuses them, saying how to use them.
Vectors always come back as float32 [n, d], keyed by the word a user types for them, as their own tools do:
the stored placeholder for official and diffusers files, the FILE NAME for AUTOMATIC1111 and kohya files
(the webui ignores their stored name), the stored name for PNGs.

Every file's model family is recognised by its widths (FAMILIES) and a mismatch with the target is refused.
"""
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ldm.checkpoint import PickledObject, atomic_write, load_checkpoint
from ldm.modules.embedding_png import is_png, preview_image, read_png_embedding, write_png_embedding
from ldm.modules.encoders.clip_tokenizer import load_clip_tokenizer
from ldm.modules.encoders.modules import BERTTokenizer

FORMATS = ("official", "a1111", "a1111-png", "a1111-safetensors", "diffusers", "kohya")
ONE_TERM_FORMATS = ("a1111", "a1111-png", "a1111-safetensors", "diffusers", "kohya")
# Token-embedding widths of each text encoder, in the order a model's encoders come.
FAMILIES = {
    (768,): "SD v1 (CLIP ViT-L, 768)",
    (1024,): "SD 2.x (OpenCLIP ViT-H, 1024)",
    (1280,): "LDM-1.4B (BERT, 1280)",
    (768, 1280): "SDXL (clip_l 768 + clip_g 1280)",
}
# The encoder keys of a multi-encoder (SDXL) file, in the order of their widths in FAMILIES.
ENCODER_KEYS = ("clip_l", "clip_g")
# Formats with an SDXL layout; AUTOMATIC1111's .pt and diffusers' one-tensor file have none.
MULTI_ENCODER_FORMATS = ("official", "a1111-png", "a1111-safetensors", "kohya")
# Which tokenizer gives the token ids of each family (OpenCLIP uses OpenAI's BPE vocabulary).
FAMILY_TOKENIZERS = {(768,): "clip", (1024,): "clip", (1280,): "bert", (768, 1280): "clip"}
# Families by the names the command-line tools take.
FAMILY_NAMES = {"sd-v1": (768,), "sd-2": (1024,), "ldm-1.4b": (1280,), "sdxl": (768, 1280)}
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".avif", ".jxl")
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"
XTI_FORMATS = ("official", "kohya-xti")
_KOHYA_LAYER = re.compile(r"(IN|OUT)\d\d|MID")
A1111_STAR_TOKEN = 265  # CLIP id of "*", which AUTOMATIC1111 writes as the (unused) placeholder token


class EmbeddingFamilyError(ValueError):
    """An embedding file made for another model family than the target, or of a family not read here."""


def describe_widths(widths):
    """The model family of token-embedding widths, e.g. (768,) -> "SD v1 (CLIP ViT-L, 768)"."""
    widths = tuple(int(w) for w in widths)
    return FAMILIES.get(widths, f"an unknown family ({' + '.join(map(str, widths))} wide)")


@dataclass
class EmbeddingFile:
    by_encoder: dict  # encoder key (None for one-encoder files) -> {concept string: float32 Tensor[n, d]}
    tokens: dict  # concept string -> token id, or None where the format does not store one
    name: str = None
    step: int = None
    format: str = "official"

    @classmethod
    def single(cls, vectors, tokens, name=None, step=None, fmt="official"):
        """A one-encoder file (SD v1, SD 2.x, LDM) from {concept: [n, d]}."""
        return cls({None: vectors}, tokens, name, step, fmt)

    @property
    def multi_encoder(self):
        return tuple(self.by_encoder) != (None,)

    @property
    def vectors(self):
        """{concept: [n, d]} of a one-encoder file; a multi-encoder file has one such dict per key in by_encoder."""
        if self.multi_encoder:
            raise ValueError(f"{self.name or 'this file'} holds one vector set per text encoder "
                             f"({', '.join(self.by_encoder)}): use by_encoder")
        return self.by_encoder[None]

    @property
    def concepts(self):
        return list(next(iter(self.by_encoder.values())))

    @property
    def widths(self):
        return tuple(next(iter(vectors.values())).shape[-1] for vectors in self.by_encoder.values())

    @property
    def family(self):
        return describe_widths(self.widths)


def check_family(path, widths, target_widths, target="this model"):
    """Refuse a file of `widths` for a target of `target_widths`, naming both families."""
    if tuple(widths) != tuple(target_widths):
        raise EmbeddingFamilyError(
            f"{path} is {describe_widths(widths)}; {target} is {describe_widths(target_widths)}: "
            "the embedding was made for another model.")


def check_tokenizer(path, widths, tokenizer):
    """Refuse token ids from `tokenizer` for a file of a known family that uses the other tokenizer."""
    expected = FAMILY_TOKENIZERS.get(tuple(widths))
    if expected is not None and tokenizer != expected:
        users = " / ".join(describe_widths(w) for w, t in FAMILY_TOKENIZERS.items() if t == tokenizer)
        raise EmbeddingFamilyError(
            f"{path} is {describe_widths(widths)}, whose placeholders are {expected} tokens; the {tokenizer} "
            f"tokenizer is for {users}.")


def _plain_mapping(value, path, key):
    """string_to_param (or another mapping entry `key` of the file) as a plain dict: unwraps the original's
    pickled nn.ParameterDict stand-in; ValueError naming the file when it is no mapping at all."""
    if not isinstance(value, (dict, PickledObject)):
        raise ValueError(f"{path}: {key} should map names to vectors, got {type(value).__name__}: the file is damaged "
                         "or not an embedding")
    if isinstance(value, PickledObject):
        state = value.state or {}
        params = state.get("_parameters", {})
        return {key: params[key] for key in state.get("_keys", params) if key in params}
    return dict(value)


def check_floating(tensor, path, what):
    """Refuse vectors stored as integers or booleans: no trainer writes them, and cast to floats they would be
    sampled as some other, meaningless concept without a word."""
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: {what} is stored as {str(tensor.dtype).removeprefix('torch.')}, not as real "
                         "floating point numbers: the file is damaged or not a learned embedding")


def _as_matrix(tensor, path, key):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{path}: embedding {key!r} should be a [d] or [n, d] tensor, got {shape}")
    check_floating(tensor, path, f"embedding {key!r}")
    tensor = tensor.detach().to(torch.float32)
    if not torch.isfinite(tensor).all():  # it would sample black images without a word
        raise ValueError(f"{path}: embedding {key!r} holds NaN or infinite values (training diverged?); use an "
                         "earlier embeddings_gs-*.pt of the run")
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


def _token_id(value):
    if value is None:
        return None
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _optional_int(value, path):
    """A file's stored step as an int (None when absent); ValueError naming the file when it is not one."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if value is None or (isinstance(value, str) and value in ("", "None")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or (not isinstance(value, str) and number != value):
        raise ValueError(f"{path}: its step {value!r} is not a whole number: the file is damaged or was edited")
    return number


def _safetensors_metadata(path):
    if not path.endswith(".safetensors"):
        return {}
    with safetensors.safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _a1111_file(data, path, name, fmt):
    params = _plain_mapping(data["string_to_param"], path, "string_to_param")
    if len(params) != 1:
        raise ValueError(f"{path}: an AUTOMATIC1111 file holds one term, found {sorted(params)}")
    return EmbeddingFile.single({name: _as_matrix(next(iter(params.values())), path, name)}, {name: None},
                                data.get("name") or Path(path).stem, _optional_int(data.get("step"), path), fmt)


def _sdxl_file(data, path, concept, name, step, fmt):
    """One concept of a {"clip_l": [n, 768], "clip_g": [n, 1280]} file (AUTOMATIC1111, kohya)."""
    missing = [key for key in ENCODER_KEYS if key not in data]
    extra = sorted(set(map(str, data)) - set(ENCODER_KEYS) - {"name", "step"})
    if missing or extra:
        raise ValueError(f"{path}: an SDXL embedding holds exactly {' and '.join(ENCODER_KEYS)}; "
                         + (f"{', '.join(missing)} missing" if missing else f"found also {', '.join(extra)}"))
    return EmbeddingFile({key: {concept: _as_matrix(data[key], path, key)} for key in ENCODER_KEYS},
                         {concept: None}, name, step, fmt)


def _official_sdxl(params, tokens, data, path):
    """The project's multi-concept SDXL layout: string_to_param holds one {concept: [n, d]} per encoder key."""
    unknown = sorted(set(map(str, params)) - set(ENCODER_KEYS))
    if unknown or len(params) != len(ENCODER_KEYS):
        raise ValueError(f"{path}: string_to_param holds one dict per text encoder, expected "
                         f"{', '.join(ENCODER_KEYS)}, found {', '.join(sorted(map(str, params)))}")
    by_encoder = {key: {s: _as_matrix(v, path, f"{key}/{s}")
                        for s, v in _plain_mapping(params[key], path, f"string_to_param/{key}").items()}
                  for key in ENCODER_KEYS}
    concepts = next(iter(by_encoder.values()))
    return EmbeddingFile(by_encoder, {s: _token_id(tokens.get(s)) for s in concepts}, data.get("name"),
                         _optional_int(data.get("step"), path), "official")


def _read(path):
    stem = Path(path).stem
    if os.path.isfile(path) and is_png(path):  # sniffing a FIFO or device would block: only regular files
        data = read_png_embedding(path)
        if any(key in data for key in ENCODER_KEYS):
            name = data.get("name") or stem
            return _sdxl_file(data, path, name, name, _optional_int(data.get("step"), path), "a1111-png")
        return _a1111_file(data, path, data.get("name") or stem, "a1111-png")
    if path.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"{path} is not a PNG image: image embeddings (AUTOMATIC1111's) are read from PNGs only")
    data = load_checkpoint(path, extra_stand_ins=(PARAMETER_DICT,))
    meta = _safetensors_metadata(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an embedding file (holds a {type(data).__name__}, expected a dict)")
    _refuse_xti(path, data)
    keys = sorted(map(str, data))
    saved_as = "a1111-safetensors" if meta.get("format") == "a1111-safetensors" else "kohya"
    if any(key in data for key in ENCODER_KEYS):
        return _sdxl_file(data, path, stem, meta.get("name") or stem, _optional_int(meta.get("step"), path),
                          saved_as)
    if "string_to_param" in data:
        if "sd_checkpoint" in data or "sd_checkpoint_name" in data:
            return _a1111_file(data, path, stem, "a1111")
        params = _plain_mapping(data["string_to_param"], path, "string_to_param")
        tokens = _plain_mapping(data.get("string_to_token", {}), path, "string_to_token")
        if params and all(isinstance(v, (dict, PickledObject)) for v in params.values()):
            return _official_sdxl(params, tokens, data, path)
        vectors = {s: _as_matrix(v, path, s) for s, v in params.items()}
        return EmbeddingFile.single(vectors, {s: _token_id(tokens.get(s)) for s in vectors},
                                    data.get("name"), _optional_int(data.get("step"), path), "official")
    if set(data) == {"emb_params"}:
        return EmbeddingFile.single({stem: _as_matrix(data["emb_params"], path, stem)}, {stem: None},
                                    meta.get("name") or stem, _optional_int(meta.get("step"), path), saved_as)
    looks_like_diffusers = data and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim in (1, 2) for k, v in data.items()
    )
    if looks_like_diffusers:
        vectors = {k: _as_matrix(v, path, k) for k, v in data.items()}
        return EmbeddingFile.single(vectors, {k: None for k in vectors}, meta.get("name"),
                                    _optional_int(meta.get("step"), path), "diffusers")
    raise ValueError(f"{path}: unrecognised embedding layout; keys found: {keys}")


def _refuse_xti(path, data):
    """An XTI (per-layer) file is read by read_xti_file only; every one-set reader refuses it here."""
    if xti_layout(data):
        layers = _xti_file(data, path).layers
        raise ValueError(f"{describe_xti(path, layers)}, which an ordinary embedding (one set for all layers) "
                         "cannot hold: sample it with --embedding_path (the scripts switch to per-layer "
                         "conditioning), train with personalization_config target ldm.modules.xti."
                         "XTIEmbeddingManager, or convert it with scripts/convert_embedding.py --to official / "
                         "kohya-xti (docs/method.md).")


def load_embedding_file(path, target_widths=None, target="this model"):
    """Read any supported embedding file (see the module docstring).

    With `target_widths` (the token-embedding widths of the model it is for), a file of another family is
    refused with an EmbeddingFamilyError naming both families.
    """
    path = os.fspath(path)
    emb = _read(path)
    if not emb.concepts:
        raise ValueError(f"{path}: the embedding file holds no vectors")
    for key, vectors in emb.by_encoder.items():
        widths = {concept: vec.shape[-1] for concept, vec in vectors.items()}
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{concept}: {width}" for concept, width in widths.items())
            against = "" if target_widths is None else f"; {target} is {describe_widths(target_widths)}"
            raise EmbeddingFamilyError(
                f"{path} holds vectors of different widths ({listed}), so they are not concepts of one text "
                f"encoder; an SDXL embedding keeps its two encoders' vectors under {' and '.join(ENCODER_KEYS)}"
                f"{against}.")
    if emb.multi_encoder:
        _check_same_concepts(path, emb.by_encoder)
    if target_widths is not None:
        check_family(path, emb.widths, target_widths, target)
    return emb


def _check_same_concepts(path, by_encoder):
    """Each text encoder's vector set must hold the same concepts with the same number of vectors."""
    counts = {key: {c: v.shape[0] for c, v in vectors.items()} for key, vectors in by_encoder.items()}
    (first_key, first), *others = counts.items()
    for key, count in others:
        if count != first:
            raise ValueError(f"{path}: the text encoders' vector sets differ ({first_key}: {first}, {key}: {count}); "
                             "each concept needs as many vectors for every encoder")


def _check_multi_encoder_save(path, by_encoder, fmt):
    if tuple(by_encoder) != ENCODER_KEYS:
        raise ValueError(f"Cannot save {path}: a multi-encoder embedding is keyed by {', '.join(ENCODER_KEYS)}, "
                         f"got {', '.join(map(str, by_encoder))}")
    if fmt not in MULTI_ENCODER_FORMATS:
        raise ValueError(
            f"The {fmt} format has no SDXL layout; save {path} as a1111-safetensors or kohya (clip_l + clip_g, "
            "which AUTOMATIC1111, kohya and diffusers read), a1111-png, or official")
    _check_same_concepts(path, by_encoder)


def _plain_tensor(tensor):
    # clone: saving a view would pickle the whole storage it points into.
    return tensor.detach().cpu().clone().contiguous()


def save_embedding_file(path, vectors, tokens=None, name=None, step=None, fmt="official"):
    """Write `vectors` atomically in format `fmt`, plain tensors only.

    `vectors`: {concept: [n, d] or [d]} for a one-encoder model, or {encoder key: {concept: [n, d]}} for SDXL
    (keys ENCODER_KEYS). `tokens` ({concept: id}) is needed for the official format. One-term formats refuse
    several concepts.
    """
    path = os.fspath(path)
    if fmt not in FORMATS:
        raise ValueError(f"Unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    multi = bool(vectors) and all(isinstance(value, dict) for value in vectors.values())
    by_encoder = vectors if multi else {None: vectors}
    by_encoder = {enc: {c: _plain_tensor(_as_matrix(v, path, c)) for c, v in concept_vectors.items()}
                  for enc, concept_vectors in by_encoder.items()}
    if multi:
        _check_multi_encoder_save(path, by_encoder, fmt)
    concepts = list(next(iter(by_encoder.values())))
    if not concepts:
        raise ValueError(f"Nothing to save to {path}: no embedding vectors given")
    if fmt in ONE_TERM_FORMATS and len(concepts) != 1:
        raise ValueError(
            f"The {fmt} format holds one concept per file, got {len(concepts)} ({', '.join(concepts)}): "
            "save each concept to its own file, or use the official format."
        )
    key = concepts[0]
    vec = by_encoder[ENCODER_KEYS[0] if multi else None][key]
    step = None if step is None else int(step)
    metadata = {k: str(v) for k, v in (("format", fmt), ("name", name), ("step", step)) if v is not None}

    if fmt == "official":
        tokens = tokens or {}
        missing = [s for s in concepts if tokens.get(s) is None]
        if missing:
            raise ValueError(f"The official format stores each placeholder's token id; none given for {missing}")
        payload = {
            "string_to_token": {s: torch.tensor(_token_id(tokens[s])) for s in concepts},
            "string_to_param": by_encoder if multi else by_encoder[None],
            "name": name,
            "step": step,
        }
    elif multi:  # AUTOMATIC1111 reads exactly these two keys (no name or step beside them)
        payload = {enc: by_encoder[enc][key] for enc in ENCODER_KEYS}
    elif fmt in ("a1111", "a1111-png"):
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

    if fmt == "a1111-png":
        if not path.lower().endswith(".png"):
            raise ValueError(f"The a1111-png format needs a .png path, got {path}")
        atomic_write(path, lambda tmp: write_png_embedding(tmp, payload, preview_image(vec)))
        return path
    if fmt == "a1111-safetensors" and not path.endswith(".safetensors"):
        raise ValueError(f"The a1111-safetensors format needs a .safetensors path, got {path}")
    if path.lower().endswith(".png"):
        raise ValueError(f"{path} ends in .png: use the a1111-png format for a PNG embedding")
    if path.endswith(".safetensors"):
        if fmt in ("official", "a1111"):
            raise ValueError(f"The {fmt} format is a pickled .pt file; {path} ends in .safetensors")
        atomic_write(path, lambda tmp: safetensors.torch.save_file(payload, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def single_token_id(token_ids_of, string):
    """The token id of `string` when it is exactly one token for `token_ids_of` (string -> ids), else None."""
    ids = token_ids_of(string)
    return ids[0] if len(ids) == 1 else None


@functools.lru_cache(maxsize=None)
def single_token_lookup(tokenizer="clip"):
    """A function string -> token id, or None when the string is not exactly one token.

    Formats other than the official one do not store token ids; this recovers them for the text encoder in use
    ("clip" for Stable Diffusion, "bert" for the LDM-1.4B model).
    """
    if tokenizer == "clip":
        tok = load_clip_tokenizer()
    elif tokenizer == "bert":
        tok = BERTTokenizer().tokenizer
    else:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}; use 'clip' or 'bert'")
    return functools.partial(single_token_id, lambda string: tok(string, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------- XTI files
def layer_order(name):
    """Sort key putting kohya layer names in UNet order: IN.., MID, OUT.."""
    return {"IN": 0, "MID": 1, "OUT": 2}[re.match(r"IN|MID|OUT", name).group()], name


@dataclass
class XTIFile:
    vectors: dict  # concept -> float32 [layers, n, d]
    layers: tuple  # layer names, in the order of the vectors' first axis
    tokens: dict  # concept -> token id or None
    name: str = None
    step: int = None
    format: str = "official"


def xti_layout(data):
    """Which XTI layout the loaded dict `data` has ("official", "kohya-xti"), or None for other files."""
    if not isinstance(data, dict) or not data:
        return None
    if "string_to_param" in data and "xti_layers" in data:
        return "official"
    # every key a kohya layer name: an XTI file even when a layer is missing (load_xti names it), never
    # one concept per layer
    if all(_KOHYA_LAYER.fullmatch(str(k)) for k in data):
        return "kohya-xti"
    return None


def _xti_vectors(tensor, path, key, ndim):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{path}: XTI entry {key!r} should have {ndim} dimensions, got {got}")
    check_floating(tensor, path, f"XTI entry {key!r}")
    tensor = tensor.detach().to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: XTI entry {key!r} holds NaN or infinite values (training diverged?)")
    return tensor


def read_xti_file(path):
    """An XTIFile, or None when `path` is not an XTI embedding (then load_embedding_file reads it)."""
    path = os.fspath(path)
    if path.lower().endswith((".png", ".webp", ".jpg", ".jpeg")):
        return None
    data = load_checkpoint(path, extra_stand_ins=(PARAMETER_DICT,))
    return _xti_file(data, path) if xti_layout(data) else None


def _xti_file(data, path):
    """The XTIFile of a loaded dict of an XTI layout (see xti_layout)."""
    if xti_layout(data) == "official":
        layers = tuple(str(n) for n in data["xti_layers"])
        params = _plain_mapping(data["string_to_param"], path, "string_to_param")
        tokens = _plain_mapping(data.get("string_to_token", {}), path, "string_to_token")
        vectors = {s: _xti_vectors(v, path, s, 3) for s, v in params.items()}
        bad = {s: v.shape[0] for s, v in vectors.items() if v.shape[0] != len(layers)}
        if bad:
            raise ValueError(f"{path}: xti_layers names {len(layers)} layers but {bad} hold other counts")
        return XTIFile(vectors, layers, {s: _token_id(tokens.get(s)) for s in vectors}, data.get("name"),
                       _optional_int(data.get("step"), path), "official")
    # kohya-xti: {layer name: [n, d]}, one concept named by the file name, as kohya's tools do
    layers = tuple(sorted(map(str, data), key=layer_order))
    stacked = torch.stack([_xti_vectors(data[k], path, k, 2) for k in layers])
    stem = Path(path).stem
    return XTIFile({stem: stacked}, layers, {stem: None}, stem, None, "kohya-xti")


def describe_xti(path, layers):
    return (f"{path} is an extended textual inversion (XTI / P+) embedding, one vector set for each of "
            f"{len(layers)} cross-attention layers ({' '.join(layers)})")


def save_xti_file(path, vectors, layers, tokens=None, name=None, step=None, fmt="official"):
    """Write XTI vectors ({concept: [layers, n, d]}) atomically.

    official:  {"string_to_token": {s: tensor(id)}, "string_to_param": {s: [layers, n, d]},
                "xti_layers": [layer names], "name", "step"}: the official layout with a leading layers axis.
    kohya-xti: {layer name: [n, d]} (.safetensors or .pt), one concept, as kohya's train_textual_inversion_XTI.py
               writes it; kohya's loader needs SD v1's 16 layers (IN01 .. OUT11).
    """
    path = os.fspath(path)
    if fmt not in XTI_FORMATS:
        raise ValueError(f"{path}: an XTI embedding is saved as {' or '.join(XTI_FORMATS)}, not {fmt}")
    layers = tuple(layers)
    vectors = {s: v.detach().cpu().float().clone().contiguous() for s, v in vectors.items()}
    for s, v in vectors.items():
        if v.ndim != 3 or v.shape[0] != len(layers):
            raise ValueError(f"Cannot save {path}: {s!r} has shape {tuple(v.shape)}, expected "
                             f"[{len(layers)} layers, n, d]")
    if fmt == "official":
        missing = [s for s in vectors if (tokens or {}).get(s) is None]
        if missing:
            raise ValueError(f"The official format stores each placeholder's token id; none given for {missing}")
        if path.endswith(".safetensors"):
            raise ValueError(f"The official format is a pickled .pt file; {path} ends in .safetensors")
        payload = {"string_to_token": {s: torch.tensor(int(tokens[s])) for s in vectors},
                   "string_to_param": vectors, "xti_layers": list(layers), "name": name,
                   "step": None if step is None else int(step)}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path
    if len(vectors) != 1:
        raise ValueError(f"The kohya-xti format holds one concept per file, got {len(vectors)} "
                         f"({', '.join(vectors)}): save each concept to its own file.")
    (stack,) = vectors.values()
    payload = {layer: stack[i].clone() for i, layer in enumerate(layers)}
    if path.endswith(".safetensors"):
        atomic_write(path, lambda tmp: safetensors.torch.save_file(payload, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path
