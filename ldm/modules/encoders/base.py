"""The two interfaces of textual inversion: what the embedding managers and LatentDiffusion need from a text
encoder (`TextEncoder`), and what LatentDiffusion, the scripts and the callbacks need from an embedding manager
(`EmbeddingManagerProtocol`).

It is a runtime-checkable `typing.Protocol`, not a base class, because the encoders that already exist
(FrozenCLIPEmbedder, BERTEmbedder) and any encoder a user names with `target:` in a YAML config satisfy it by
shape alone, without inheriting from us. `isinstance(encoder, TextEncoder)` checks member presence (not
signatures), enough for the code that instantiates a config to refuse a wrong class with a clear message.

Two facts about an encoder are derived rather than required, so the existing encoders need no change:
`context_length` (positions per prompt) and `embedding_key` (the key of this encoder's
vectors in an embedding file: "clip_l"/"clip_g" for the two encoders of SDXL, None for the one-encoder layout
`string_to_param` of SD v1, SD 2.x and LDM).
"""
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TextEncoder(Protocol):
    embedding_dim: int  # width of the token embeddings, the size of one learned vector
    token_embedding: nn.Embedding  # the lookup table the manager's vectors stand in for

    def tokenize(self, text) -> torch.LongTensor:
        """Token ids (b, max_length) of a string or a list of strings, on the encoder's device."""

    def encode_tokens(self, tokens, embedding_manager=None):
        """The conditioning for token ids from `tokenize`; `embedding_manager(tokens, embedded)` is called right
        after the token-embedding lookup, before positions are added."""

    def string_to_token_ids(self, string) -> list:
        """Ids of `string` without start/end tokens."""


@runtime_checkable
class EmbeddingManagerProtocol(Protocol):
    """An embedding manager: the learned vectors of textual inversion, spliced into a prompt's token embeddings.

    Implemented by EmbeddingManager (one text encoder), XTIEmbeddingManager (one vector set per cross-attention
    layer) and MultiEmbeddingManager (one EmbeddingManager per text encoder, SDXL); nothing tells them apart
    but these members. A manager named by `personalization_config.target` must provide them too.
    """
    per_layer: bool  # class attribute: one context per cross-attention layer (it is built with the UNet)
    progressive_step: Optional[int]  # the global step, set by the training loop (progressive_words)

    @property
    def concepts(self) -> list:
        """The concept strings, in order (the first is the one `log_images` samples)."""

    def manager_for(self, encoder):
        """The module `encoder` calls right after its token-embedding lookup (see TextEncoder.encode_tokens)."""

    def encode_tokens(self, encoder, tokens):
        """The conditioning of token ids `tokens` from `encoder.tokenize`, with the learned vectors spliced in."""

    def names_lost_in(self, text) -> list:
        """Concepts written in `text` whose tokens its tokenization hides, so the prompt will not use them."""

    def load(self, paths, placeholder_strings=None) -> list:
        """Add the concepts of embedding files; returns (word, file, number of vectors) for each."""

    def save(self, path, step=None, name=None, fmt="official"):
        """Write every concept to `path` in format `fmt` (ldm.modules.embedding_io)."""

    def interchange_format(self) -> Optional[str]:
        """The format other tools read, written beside embeddings.pt as embeddings.safetensors, or None when
        the official file is what they read."""

    def embedding_parameters(self):
        """The trainable vectors."""

    def embedding_to_coarse_loss(self):
        """The regulariser: distance of the vectors from their initial values."""


def context_length(encoder: TextEncoder) -> int:
    """Positions `encoder` reads per prompt, start and end tokens included (its `max_length`; 77, CLIP's, when
    it does not say)."""
    return getattr(encoder, "max_length", 77)


def embedding_key(encoder: TextEncoder) -> Optional[str]:
    """Key of `encoder`'s vectors in a multi-encoder embedding file; None for the one-encoder layout.

    An encoder of a multi-encoder family declares it as the class attribute `embedding_key`.
    """
    return getattr(encoder, "embedding_key", None)
