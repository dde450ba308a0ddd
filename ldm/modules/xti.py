"""Extended textual inversion (XTI, "P+": Voynov et al. 2023): one vector set per cross-attention layer.

Ordinary textual inversion gives every cross-attention layer of the UNet the same text context. XTI learns, for
each placeholder, one vector set per cross-attention layer; the text encoder runs once per layer (batched: the
token rows repeated once per layer) and layer i of the UNet attends to the i-th context.

- Layers and contexts: ldm.modules.diffusionmodules.layer_contexts (the UNet numbers and names its
  cross-attention layers as kohya-ss/sd-scripts does: SD v1 has 16, IN01 IN02 IN04 IN05 IN07 IN08 MID
  OUT03..OUT11, the toy model 7). A per-layer conditioning is one tensor (batch, layers, tokens, width), so it
  batches, casts and moves like an ordinary context; only the classifier-free-guidance concatenation broadcasts
  the plain unconditional context to every layer. A batch without any placeholder gets the ordinary context.
- Training: `personalization_config.target: ldm.modules.xti.XTIEmbeddingManager` (configs/toy/recipes/xti.yaml);
  each layer's vectors start from the init word like the ordinary manager's.
- Files: ldm.modules.embedding_io's `save_xti_file` / `read_xti_file` (the official layout with a layers axis,
  and kohya's).
"""
import os

import torch

from ldm.modules.embedding_io import check_family, describe_xti, load_embedding_file, read_xti_file, save_xti_file
from ldm.modules.embedding_manager import EmbeddingManager


class XTIEmbeddingManager(EmbeddingManager):
    """EmbeddingManager with one vector set per cross-attention layer: parameters [layers, n, d].

    unet: the diffusion model (its cross-attention layers are counted and named), given by LatentDiffusion
        (TextualInversion.setup_textual_inversion); or layer_names for a manager built without one. Other
        arguments as EmbeddingManager's.
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

    def interchange_format(self):
        """None: other tools read no per-layer layout but kohya's (scripts/convert_embedding.py --to kohya-xti)."""
        return None

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

