"""Extended textual inversion (XTI, "P+": Voynov et al. 2023): one vector set per cross-attention layer.

Ordinary textual inversion gives every cross-attention layer of the UNet the same text context. XTI learns, for
each placeholder, one vector set per cross-attention layer; the text encoder runs once per layer (batched: the
token rows repeated once per layer) and layer i of the UNet attends to the i-th context.

- Layers: the UNet's SpatialTransformers in module order (input blocks, middle block, output blocks), named as
  kohya-ss/sd-scripts names them: "IN01" (the transformer in input_blocks[1]), "MID", "OUT03" (in
  output_blocks[3]). SD v1 has 16 (IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11), the toy model 7.
- Contexts: a per-layer conditioning is one tensor (batch, layers, tokens, width); SpatialTransformer takes its
  own slice `context[:, layer_index]`. Being a tensor, it batches, casts and moves like an ordinary context;
  only the classifier-free-guidance concatenation broadcasts the plain unconditional context to every layer
  (`broadcast_to_layers`). A batch without any placeholder gets the ordinary plain context.
- Training: `personalization_config.target: ldm.modules.xti.XTIEmbeddingManager` (configs/toy/recipes/xti.yaml);
  each layer's vectors start from the init word like the ordinary manager's.
- Files: see `save_xti_file` / `read_xti_file` (ours, the official layout with a layers axis, and kohya's).
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ldm.modules.attention import SpatialTransformer
from ldm.modules.embedding_io import check_floating
from ldm.modules.embedding_manager import EmbeddingManager

XTI_FORMATS = ("official", "kohya-xti")
_KOHYA_LAYER = re.compile(r"(IN|OUT)\d\d|MID")


# ---------------------------------------------------------------------------------------------- layers
def number_cross_attention_layers(unet):
    """Give each SpatialTransformer of `unet` its `layer_index` and return the layer names, in that order."""
    names = []
    blocks = [("IN", i, b) for i, b in enumerate(unet.input_blocks)] + [("MID", None, unet.middle_block)] + \
             [("OUT", i, b) for i, b in enumerate(unet.output_blocks)]
    for prefix, index, block in blocks:
        transformers = [m for m in block.modules() if isinstance(m, SpatialTransformer)]
        for k, transformer in enumerate(transformers):
            name = prefix if index is None else f"{prefix}{index:02d}"
            transformer.layer_index = len(names)
            names.append(name if len(transformers) == 1 else f"{name}_{k}")
    return tuple(names)


def check_layer_contexts(context, layer_names):
    """Refuse per-layer contexts whose layer count is not the UNet's."""
    if context.ndim == 4 and context.shape[1] != len(layer_names):
        raise ValueError(f"The conditioning holds {context.shape[1]} per-layer contexts but this UNet has "
                         f"{len(layer_names)} cross-attention layers ({' '.join(layer_names)}).")


def broadcast_to_layers(context, num_layers):
    """A plain context (b, n, d) as the same context for every layer (b, layers, n, d)."""
    return context.unsqueeze(1).expand(-1, num_layers, -1, -1)


def layer_order(name):
    """Sort key putting kohya layer names in UNet order: IN.., MID, OUT.."""
    return {"IN": 0, "MID": 1, "OUT": 2}[re.match(r"IN|MID|OUT", name).group()], name


# ---------------------------------------------------------------------------------------------- files
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


def _vectors(tensor, path, key, ndim):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{path}: XTI entry {key!r} should have {ndim} dimensions, got {got}")
    check_floating(tensor, path, f"XTI entry {key!r}")
    tensor = tensor.detach().to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: XTI entry {key!r} holds NaN or infinite values (training diverged?)")
    return tensor


def read_xti_file(path):
    """An XTIFile, or None when `path` is not an XTI embedding (then ldm.modules.embedding_io reads it)."""
    from ldm.checkpoint import load_checkpoint
    from ldm.modules.embedding_io import PARAMETER_DICT, _optional_int, _plain_mapping, _token_id
    path = os.fspath(path)
    if path.lower().endswith((".png", ".webp", ".jpg", ".jpeg")):
        return None
    data = load_checkpoint(path, extra_stand_ins=(PARAMETER_DICT,))
    layout = xti_layout(data)
    if layout == "official":
        layers = tuple(str(n) for n in data["xti_layers"])
        params = _plain_mapping(data["string_to_param"], path, "string_to_param")
        tokens = _plain_mapping(data.get("string_to_token", {}), path, "string_to_token")
        vectors = {s: _vectors(v, path, s, 3) for s, v in params.items()}
        bad = {s: v.shape[0] for s, v in vectors.items() if v.shape[0] != len(layers)}
        if bad:
            raise ValueError(f"{path}: xti_layers names {len(layers)} layers but {bad} hold other counts")
        return XTIFile(vectors, layers, {s: _token_id(tokens.get(s)) for s in vectors}, data.get("name"),
                       _optional_int(data.get("step"), path), "official")
    if layout == "kohya-xti":  # {layer name: [n, d]}, one concept named by the file name, as kohya's tools do
        layers = tuple(sorted(map(str, data), key=layer_order))
        stacked = torch.stack([_vectors(data[k], path, k, 2) for k in layers])
        stem = Path(path).stem
        return XTIFile({stem: stacked}, layers, {stem: None}, stem, None, "kohya-xti")
    return None


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
    from ldm.checkpoint import atomic_write
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


# ---------------------------------------------------------------------------------------------- manager
class XTIEmbeddingManager(EmbeddingManager):
    """EmbeddingManager with one vector set per cross-attention layer: parameters [layers, n, d].

    unet: the diffusion model (its cross-attention layers are counted and named), given by LatentDiffusion
        (`manager_kwargs`); or layer_names for a manager built without one. Other arguments as EmbeddingManager's.
    """
    per_layer = True

    def __init__(self, embedder, unet=None, layer_names=None, **kwargs):
        if layer_names is None:
            if unet is None or not getattr(unet, "cross_attention_layer_names", ()):
                raise ValueError("XTIEmbeddingManager needs a UNet with cross-attention layers "
                                 "(use_spatial_transformer) to learn one vector set per layer.")
            layer_names = unet.cross_attention_layer_names
        self.layer_names = tuple(layer_names)
        super().__init__(embedder, **kwargs)

    def _set_placeholder(self, string, token_ids, vectors):
        if vectors.ndim == 2:  # one set (an init word, an ordinary file): every layer starts from it
            vectors = vectors.unsqueeze(0).repeat(len(self.layer_names), 1, 1)
        super()._set_placeholder(string, token_ids, vectors)

    def _layer_vectors(self, layer):
        return {s: p[layer] for s, p in self.string_to_param_dict.items()}

    def forward(self, tokenized_text, embedded_text):
        """Rows come as `encode_tokens` makes them: the prompts once per layer; each block gets its layer's
        vectors."""
        if not self.string_to_param_dict:
            return embedded_text
        num_layers = len(self.layer_names)
        if tokenized_text.shape[0] % num_layers:
            raise ValueError(f"XTIEmbeddingManager: {tokenized_text.shape[0]} rows are not the prompts repeated "
                             f"once per layer ({num_layers}); encode text with encode_tokens.")
        return torch.cat([self._rewrite(tokens, embedded, self._layer_vectors(layer)) for layer, (tokens, embedded)
                          in enumerate(zip(tokenized_text.chunk(num_layers), embedded_text.chunk(num_layers)))])

    def encode_tokens(self, encoder, tokens):
        """The conditioning of token ids `tokens` (b, n): (b, layers, n, d), one context per layer, or the
        ordinary (b, n, d) when no prompt holds a concept (the unconditional one, for example)."""
        first_ids = torch.tensor([seq[0] for seq in self._token_sequences().values()], device=tokens.device)
        if not torch.isin(tokens, first_ids).any():
            return encoder.encode_tokens(tokens, embedding_manager=None)
        num_layers, b = len(self.layer_names), tokens.shape[0]
        c = encoder.encode_tokens(tokens.repeat(num_layers, 1), embedding_manager=self)
        return c.view(num_layers, b, *c.shape[1:]).transpose(0, 1)

    def spliced_token_ids(self, tokenized_text):
        raise NotImplementedError("XTI is for one-encoder models whose conditioning is the last hidden state "
                                  "(SD v1, SD 2.x, LDM, the toy model).")

    def get_embedding_norms_squared(self):
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in self.string_to_param_dict.values()]).pow(2).sum(-1)

    def embedding_to_coarse_loss(self):
        """The ordinary regulariser averaged over layers (equal to it when every layer holds the same set)."""
        return super().embedding_to_coarse_loss() / len(self.layer_names)

    def save(self, ckpt_path, step=None, name=None, fmt="official"):
        if self.string_to_token_sequence:
            raise ValueError(f"{', '.join(map(repr, self.string_to_token_sequence))}: several tokens each; the "
                             "official format stores one token id per placeholder.")
        vectors = {s: p.detach() for s, p in self.string_to_param_dict.items()}
        tokens = {s: int(t) for s, t in self.string_to_token_dict.items()}
        return save_xti_file(ckpt_path, vectors, self.layer_names, tokens=tokens,
                             name=name or ",".join(vectors), step=step, fmt=fmt)

    def load(self, ckpt_paths, placeholder_strings=None):
        """Add concepts from XTI files (their layers must be this UNet's) or ordinary files (every layer gets
        the file's vectors)."""
        from ldm.modules.embedding_io import check_family, load_embedding_file
        paths = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
        loaded = []
        for path in paths:
            xti = read_xti_file(path)
            if xti is None:
                emb = load_embedding_file(path, target_widths=(self.token_dim,))
                loaded += [(path, name, vectors) for name, vectors in emb.vectors.items()]
                continue
            missing = [name for name in self.layer_names if name not in xti.layers]
            if missing and set(xti.layers) < set(self.layer_names):
                raise ValueError(f"{path} is an extended textual inversion (XTI / P+) embedding without the "
                                 f"layer{'s' if len(missing) > 1 else ''} {' '.join(missing)} of this model's "
                                 f"{len(self.layer_names)}: the file is incomplete.")
            if xti.layers != self.layer_names:
                raise ValueError(f"{describe_xti(path, xti.layers)}; this model's UNet has "
                                 f"{len(self.layer_names)} ({' '.join(self.layer_names)}): it was trained for "
                                 "another model.")
            for name, vectors in xti.vectors.items():
                check_family(path, (vectors.shape[-1],), (self.token_dim,))
                loaded.append((path, name, vectors))
        return self.add_concepts(loaded, placeholder_strings)


def is_per_layer(personalization_config):
    """Whether the config's manager class is a per-layer (XTI) one."""
    from ldm.util import get_obj_from_str
    return getattr(get_obj_from_str(personalization_config["target"]), "per_layer", False)


def manager_kwargs(personalization_config, diffusion_model):
    """Extra arguments LatentDiffusion gives the embedding manager: the UNet, for a per-layer (XTI) one."""
    return {"unet": diffusion_model} if is_per_layer(personalization_config) else {}


def use_xti_manager(model):
    """Swap an ordinary embedding manager of `model` for an empty XTI one (to sample an XTI file with a config
    written for ordinary embeddings); returns the manager."""
    manager = model.embedding_manager
    if not getattr(manager, "per_layer", False):
        manager = XTIEmbeddingManager(model.cond_stage_model, unet=model.model.diffusion_model,
                                      placeholder_strings=list(manager.string_to_token_dict) or None)
        model.embedding_manager = manager.to(model.device)
    return manager
