"""Conditioning encoders: class labels, LDM's BERT-style text encoder and Stable Diffusion's CLIP text encoder.

The text encoders take an optional `embedding_manager` (textual inversion): it rewrites the token
embeddings of placeholder words right after the token-embedding lookup, before positions are added.
Both offer the same small interface the EmbeddingManager relies on: `tokenize`, `encode_tokens`,
`string_to_token_ids`, `token_embedding` and `embedding_dim`.
"""
import inspect
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.clip_tokenizer import (
    BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, VOCAB_SIZE, load_clip_tokenizer,
)
from ldm.modules.x_transformer import Encoder, TransformerWrapper

BERT_VOCAB_DIR = Path(__file__).resolve().parents[3] / "models" / "bert"

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
# The text tower of OpenAI's ViT-L/14, the text encoder of Stable Diffusion v1.
CLIP_VIT_L14_TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=768, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
)


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    def __init__(self, embed_dim, n_classes=1000, key="class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch, key=None):
        # (b,) labels -> (b, 1, embed_dim), a one-token context for cross-attention
        return self.embedding(batch[key or self.key][:, None])


def _parameter_device(module):
    return next(module.parameters()).device


class TransformerEmbedder(AbstractEncoder):
    """Some transformer encoder layers over token ids.

    `device` is accepted for compatibility with the original configs; the module's parameters decide.
    """

    def __init__(self, n_embed, n_layer, vocab_size, max_seq_len=77, device=None):
        super().__init__()
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    def forward(self, tokens):
        return self.transformer(tokens.to(_parameter_device(self)), return_embeddings=True)

    def encode(self, x):
        return self(x)


class BERTTokenizer(AbstractEncoder):
    """bert-base-uncased WordPiece (30,522 tokens) from the vocabulary shipped in models/bert."""

    def __init__(self, device=None, vq_interface=True, max_length=77, vocab_dir=None):
        super().__init__()
        from transformers import BertTokenizerFast
        self.tokenizer = BertTokenizerFast.from_pretrained(
            str(vocab_dir or BERT_VOCAB_DIR), local_files_only=True, do_lower_case=True, model_max_length=max_length)
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length

    def forward(self, text):
        tokens = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                                return_tensors="pt")["input_ids"]
        return tokens if self.device is None else tokens.to(self.device)

    @torch.no_grad()
    def encode(self, text):
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text):
        return text


class BERTEmbedder(AbstractEncoder):
    """LDM-1.4B's text encoder: the BERT tokenizer and a transformer trained from scratch.

    `device` is accepted for compatibility with the original configs; the module's parameters decide.
    """

    def __init__(self, n_embed, n_layer, vocab_size=30522, max_seq_len=77, device=None, use_tokenizer=True,
                 embedding_dropout=0.0):
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        self.max_length = max_seq_len
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    @property
    def device(self):
        return _parameter_device(self)

    @property
    def embedding_dim(self):
        return self.transformer.token_emb.embedding_dim

    @property
    def token_embedding(self):
        return self.transformer.token_emb

    def string_to_token_ids(self, string):
        """Ids of `string` without [CLS]/[SEP]."""
        return self.tknz_fn.tokenizer(string, add_special_tokens=False, verbose=False)["input_ids"]

    def tokenize(self, text):
        return self.tknz_fn(text).to(self.device) if self.use_tknz_fn else text.to(self.device)

    def encode_tokens(self, tokens, embedding_manager=None):
        return self.transformer(tokens.to(self.device), return_embeddings=True, embedding_manager=embedding_manager)

    def forward(self, text, embedding_manager=None):
        return self.encode_tokens(self.tokenize(text), embedding_manager=embedding_manager)

    def encode(self, text, **kwargs):
        return self(text, **kwargs)


# --- CLIP -------------------------------------------------------------------------------------------
# The forwards of the embeddings, the text transformer and the outer CLIPTextModel are rebound so that
# `transformer(input_ids=..., embedding_manager=em)` reaches the embeddings. transformers 4.x nests the
# text transformer at `CLIPTextModel.text_model`; 5.x flattens it into CLIPTextModel itself.

def _text_transformer(clip_text_model):
    return getattr(clip_text_model, "text_model", clip_text_model)


def _embeddings_forward(self, input_ids=None, position_ids=None, inputs_embeds=None, embedding_manager=None):
    if inputs_embeds is None:
        inputs_embeds = self.token_embedding(input_ids)
    if embedding_manager is not None:
        inputs_embeds = embedding_manager(input_ids, inputs_embeds)
    if position_ids is None:
        position_ids = self.position_ids[:, :inputs_embeds.shape[-2]]
    return inputs_embeds + self.position_embedding(position_ids)


def _causal_encoder_5x(text_transformer, hidden_states):
    from transformers.masking_utils import create_causal_mask
    # None for SDPA (it then uses its fused causal path); an explicit mask for eager attention.
    mask = create_causal_mask(config=text_transformer.config, inputs_embeds=hidden_states,
                              attention_mask=None, cache=None)
    return text_transformer.encoder(inputs_embeds=hidden_states, attention_mask=mask, is_causal=True)


def _causal_encoder_4x(text_transformer, hidden_states):
    from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask
    mask = _create_4d_causal_attention_mask(hidden_states.shape[:2], hidden_states.dtype, device=hidden_states.device)
    return text_transformer.encoder(inputs_embeds=hidden_states, causal_attention_mask=mask)


def _text_transformer_forward(self, input_ids=None, position_ids=None, inputs_embeds=None, embedding_manager=None):
    """Last hidden state (b, n, d) of the causal text transformer."""
    hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                    embedding_manager=embedding_manager)
    encoder_output = self._run_causal_encoder(self, hidden_states)
    return self.final_layer_norm(encoder_output[0])


def _outer_forward(self, input_ids=None, position_ids=None, inputs_embeds=None, embedding_manager=None):
    return self.text_model(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                           embedding_manager=embedding_manager)


def _patch_clip_forwards(clip_text_model):
    text_transformer = _text_transformer(clip_text_model)
    uses_4x_masks = "causal_attention_mask" in inspect.signature(text_transformer.encoder.forward).parameters
    text_transformer._run_causal_encoder = _causal_encoder_4x if uses_4x_masks else _causal_encoder_5x
    text_transformer.embeddings.forward = _embeddings_forward.__get__(text_transformer.embeddings)
    text_transformer.forward = _text_transformer_forward.__get__(text_transformer)
    if text_transformer is not clip_text_model:
        clip_text_model.forward = _outer_forward.__get__(clip_text_model)


def _official_layout_hooks(clip_text_model):
    """Keep checkpoints in the official `text_model.*` layout whatever transformers is installed.

    SD checkpoints may also carry the `embeddings.position_ids` buffer, which recent versions no longer persist.
    """
    flat = not hasattr(clip_text_model, "text_model")

    def to_official(module, state_dict, prefix, local_metadata):
        if not flat:
            return
        # Our keys were just appended at the end, so re-inserting them keeps the dict's order.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + "text_model." + key[len(prefix):]] = state_dict.pop(key)

    def from_official(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
        nested = prefix + "text_model."
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key.endswith("embeddings.position_ids"):
                del state_dict[key]
            elif flat and key.startswith(nested):
                state_dict[prefix + key[len(nested):]] = state_dict.pop(key)

    clip_text_model.register_state_dict_post_hook(to_official)
    clip_text_model.register_load_state_dict_pre_hook(from_official)


def _load_clip(version, config):
    """(tokenizer, CLIPTextModel) without touching the model hub."""
    overrides = dict(config or {})
    if Path(version).is_dir():
        root = Path(version)
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        has_tokenizer = any((d / "vocab.json").is_file() for d in (root, root / "tokenizer"))
        tokenizer = load_clip_tokenizer(root if has_tokenizer else None)
        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True, **overrides)
        return tokenizer, model
    if version != CLIP_VIT_L14:
        raise ValueError(
            f"FrozenCLIPEmbedder: {version!r} is neither {CLIP_VIT_L14!r} nor a local directory. Downloads from "
            "the model hub are not supported; download the model yourself and pass its local directory as version.")
    # Random weights: the Stable Diffusion checkpoint holds the trained text encoder and fills them.
    text_config = CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, "attn_implementation": "sdpa", **overrides})
    return load_clip_tokenizer(), CLIPTextModel(text_config)


def _resolve_blends(encoder, blends):
    """{marker token id: [token ids of its words]} from the train_blends config."""
    resolved = {}
    for marker, words in dict(blends).items():
        if isinstance(words, str) or not words:
            raise ValueError(f"train_blends[{marker!r}] must be a non-empty list of words, not {words!r}")
        marker_ids = encoder.string_to_token_ids(marker)
        if len(marker_ids) != 1:
            raise ValueError(f"train_blends: marker {marker!r} is {len(marker_ids)} tokens {marker_ids}; it must be "
                             "exactly one (pick another string, e.g. a single symbol such as '&')")
        resolved[marker_ids[0]] = [encoder.string_to_token_ids(word) for word in words]
    return resolved


def mean_of_words(token_embedding, words_ids):
    """(d,) mean of the words' embeddings, each word's the mean of its tokens' ("cy"+"an"): a train_blends marker's
    embedding, differentiable in the words'."""
    weight = token_embedding.weight
    return torch.stack([weight[ids].mean(0) for ids in words_ids]).mean(0)


class _BlendThen:
    """An embedding-manager callable: give each marker the mean of its words' embeddings (gradients reach those
    words), then apply the real manager, if any."""

    def __init__(self, blends, token_embedding, then=None):
        self.blends, self.token_embedding, self.then = blends, token_embedding, then

    def __call__(self, input_ids, embeds):
        for marker, words_ids in self.blends.items():
            where = input_ids == marker
            if where.any():
                blend = mean_of_words(self.token_embedding, words_ids).to(embeds.dtype)
                embeds = torch.where(where[..., None], blend, embeds)
        return embeds if self.then is None else self.then(input_ids, embeds)


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP's text transformer (Stable Diffusion v1), with forwards that thread an embedding manager.

    version: "openai/clip-vit-large-patch14" (built from its config, weights from the SD checkpoint) or a local
    directory with a saved CLIPTextModel (and optionally its tokenizer). config: CLIPTextConfig field overrides,
    e.g. small sizes for toy models. `device` is accepted for compatibility; the module's parameters decide.
    train_blends: {marker: [word, ...]} for training a base model only (toy world v2): in training mode the
    embedding of each single-token marker is the mean of its words' embeddings (a word's: its tokens' mean), so
    captions can point between words (an in-between hue) without a word for the point; in eval mode a marker is an
    ordinary token.
    """

    def __init__(self, version=CLIP_VIT_L14, device=None, max_length=77, freeze=True, config=None,
                 train_blends=None):
        super().__init__()
        self.tokenizer, self.transformer = _load_clip(version, config)
        self.max_length = max_length
        self.train_blends = _resolve_blends(self, train_blends or {})
        _patch_clip_forwards(self.transformer)
        _official_layout_hooks(self.transformer)
        if freeze:
            self.freeze()

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    @property
    def device(self):
        return _parameter_device(self)

    @property
    def text_model(self):
        """The text transformer (embeddings, encoder, final_layer_norm) under any transformers version."""
        return _text_transformer(self.transformer)

    @property
    def embedding_dim(self):
        return self.transformer.config.hidden_size

    @property
    def token_embedding(self):
        return self.text_model.embeddings.token_embedding

    def string_to_token_ids(self, string):
        """Ids of `string` without the start/end tokens, however long (prompt_positions reports a cut)."""
        return self.tokenizer(string, add_special_tokens=False, verbose=False)["input_ids"]

    def tokenize(self, text):
        """Token ids (b, max_length): start token, text, end token, padded with the end token."""
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
        return batch["input_ids"].to(self.device)

    def encode_tokens(self, tokens, embedding_manager=None):
        """Last hidden state (b, n, d) for token ids from `tokenize` (callers may cache them)."""
        if self.training and self.train_blends:
            embedding_manager = _BlendThen(self.train_blends, self.token_embedding, embedding_manager)
        return self.transformer(input_ids=tokens.to(self.device), embedding_manager=embedding_manager)

    def forward(self, text, embedding_manager=None):
        return self.encode_tokens(self.tokenize(text), embedding_manager=embedding_manager)

    def encode(self, text, **kwargs):
        return self(text, **kwargs)


# SD 2.x and SDXL encoders, importable under the original module path as Stability's configs name them.
from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2  # noqa: E402,F401
