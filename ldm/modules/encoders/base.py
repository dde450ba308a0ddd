"""The text-encoder interface: what the EmbeddingManager and LatentDiffusion need from a text encoder.

It is a runtime-checkable `typing.Protocol`, not a base class, because the encoders that already exist
(FrozenCLIPEmbedder, BERTEmbedder) and any encoder a user names with `target:` in a YAML config satisfy it by
shape alone, without inheriting from us. `isinstance(encoder, TextEncoder)` checks member presence (not
signatures), enough for the code that instantiates a config to refuse a wrong class with a clear message.

Three facts about an encoder are derived rather than required, so the existing encoders need no change:
`is_single_token` (a placeholder must be exactly one token), `context_length` (positions per prompt) and
`embedding_key` (the key of this encoder's
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


def is_single_token(encoder: TextEncoder, string: str) -> bool:
    """Whether `string` is exactly one token for `encoder`'s tokenizer (a placeholder must be)."""
    return len(encoder.string_to_token_ids(string)) == 1


def context_length(encoder: TextEncoder) -> int:
    """Positions `encoder` reads per prompt, start and end tokens included (its `max_length`; 77, CLIP's, when
    it does not say)."""
    return getattr(encoder, "max_length", 77)


def embedding_key(encoder: TextEncoder) -> Optional[str]:
    """Key of `encoder`'s vectors in a multi-encoder embedding file; None for the one-encoder layout.

    An encoder of a multi-encoder family declares it as the class attribute `embedding_key`.
    """
    return getattr(encoder, "embedding_key", None)
