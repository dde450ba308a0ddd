"""OpenCLIP text towers: the text encoders of Stable Diffusion 2.x (ViT-H/14) and SDXL's second (ViT-bigG/14).

Written here, without the `open_clip` package (its import pulls torchvision) and without the hub, with OpenCLIP's
parameter names, so the official checkpoints' `cond_stage_model.model.*` (SD 2.x) and
`conditioner.embedders.1.model.*` (SDXL) keys load and save unchanged. The weights come from those checkpoints;
the pretrained tag in `version` only names which ones.

The tower, as OpenCLIP builds it: token embedding + learned positions, pre-LayerNorm residual blocks with causal
self-attention (one packed `in_proj`) and a GELU MLP (exact GELU: OpenCLIP uses QuickGELU only for OpenAI's
models, ViT-H/bigG were trained with nn.GELU), a final LayerNorm `ln_final`, `text_projection` (width x embed_dim)
and CLIP's `logit_scale`, unused here but part of the checkpoint. The tokenizer is OpenAI's CLIP BPE (the same
vocabulary), padded with id 0 as OpenCLIP's `tokenize` does.
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.clip_tokenizer import MAX_LENGTH, VOCAB_SIZE, load_clip_tokenizer

OPENCLIP_PAD_TOKEN_ID = 0

# text_cfg and embed_dim of OpenCLIP's model configs; context_length 77 and vocab_size 49408 for both.
ARCHS = {
    "ViT-H-14": dict(width=1024, layers=24, heads=16, embed_dim=1024),
    "ViT-bigG-14": dict(width=1280, layers=32, heads=20, embed_dim=1280),
}
# OpenCLIP's pretrained tags for these archs (the ones Stability's configs name).
PRETRAINED_TAGS = {"ViT-H-14": ("laion2b_s32b_b79k",), "ViT-bigG-14": ("laion2b_s39b_b160k",)}


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with nn.MultiheadAttention's parameter names, batch first, through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"OpenCLIP text tower: width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, start=0, stop=None):
        """Run blocks[start:stop] on x (b, n, width)."""
        for block in self.resblocks[start:stop]:
            x = block(x)
        return x


class OpenCLIPTextTower(nn.Module):
    """The text half of OpenCLIP's CLIP model, under its own attribute names."""

    def __init__(self, width, layers, heads, embed_dim, context_length=MAX_LENGTH, vocab_size=VOCAB_SIZE):
        super().__init__()
        # state_dict order as OpenCLIP's: own parameters, then transformer, token_embedding, ln_final.
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.transformer = Transformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.ln_final = nn.LayerNorm(width)
        self._init_parameters(width, layers)

    def _init_parameters(self, width, layers):
        # OpenCLIP's initialisation, so a tower trained from scratch (toy models) starts as OpenCLIP's does.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def num_layers(self):
        return len(self.transformer.resblocks)

    def embed(self, tokens, embedding_manager=None):
        """Token embeddings, rewritten by the manager, plus positions: the input of the first block."""
        embedded = self.token_embedding(tokens)
        if embedding_manager is not None:
            embedded = embedding_manager(tokens, embedded)
        return embedded + self.positional_embedding[:tokens.shape[1]]

    def pool(self, last_hidden, tokens):
        """OpenCLIP's text features: ln_final at the end token (the highest id of each row) @ text_projection."""
        eot = last_hidden[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        return self.ln_final(eot) @ self.text_projection


def tower_config(arch, config=None):
    if arch not in ARCHS:
        raise ValueError(f"OpenCLIP text encoder: unknown arch {arch!r}; known: {', '.join(ARCHS)}.")
    config = dict(config or {})
    unknown = set(config) - {"width", "layers", "heads", "embed_dim", "context_length", "vocab_size"}
    if unknown:
        raise ValueError(f"OpenCLIP text encoder: unknown config keys {sorted(unknown)}; "
                         "use width, layers, heads, embed_dim, context_length, vocab_size.")
    return {**ARCHS[arch], **config}


class FrozenOpenCLIPEmbedder(nn.Module):
    """Stable Diffusion 2.x's text encoder (Stability's class name and config keys).

    layer: "last" runs every block, "penultimate" all but the last; either is then put through `ln_final`.
    The output is the hidden state of all tokens (b, 77, width). `version` is OpenCLIP's pretrained tag (the
    weights come from the Stable Diffusion checkpoint); `device` is accepted for compatibility, the module's
    parameters decide. config: overrides of the tower's sizes (width, layers, heads, embed_dim, ...), e.g. tiny
    towers for tests and toy models.
    """

    LAYERS = ("last", "penultimate")
    embedding_key = None  # SD 2.x embedding files hold one vector set, as SD v1's

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device=None, max_length=77, freeze=True,
                 layer="last", config=None):
        super().__init__()
        self._check_choice("layer", layer, self.LAYERS)
        cfg = tower_config(arch, config)
        if version not in PRETRAINED_TAGS[arch]:
            raise ValueError(
                f"{type(self).__name__}: version {version!r} is not an OpenCLIP pretrained tag of {arch} "
                f"({', '.join(PRETRAINED_TAGS[arch])}). The weights are read from the diffusion checkpoint, "
                "never downloaded; pass the tag its config names.")
        if max_length > cfg.get("context_length", MAX_LENGTH):
            raise ValueError(f"{type(self).__name__}: max_length {max_length} exceeds the tower's context length.")
        self.model = OpenCLIPTextTower(**cfg)
        self.tokenizer = load_clip_tokenizer()
        self.max_length = max_length
        self.layer = layer
        if freeze:
            self.freeze()

    def _check_choice(self, name, value, choices):
        if value not in choices:
            raise ValueError(f"{type(self).__name__}: {name} must be one of {', '.join(choices)}, not {value!r}.")

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    @property
    def device(self):
        return self.model.token_embedding.weight.device

    @property
    def embedding_dim(self):
        return self.model.token_embedding.embedding_dim

    @property
    def token_embedding(self):
        return self.model.token_embedding

    def string_to_token_ids(self, string):
        """Ids of `string` without the start/end tokens."""
        return self.tokenizer(string, add_special_tokens=False, verbose=False)["input_ids"]

    def tokenize(self, text):
        """Token ids (b, max_length) as OpenCLIP's tokenize: start, text, end (kept on truncation), then zeros."""
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
        tokens = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, OPENCLIP_PAD_TOKEN_ID)
        return tokens.to(self.device)

    def encode_tokens(self, tokens, embedding_manager=None):
        """ln_final of the chosen layer's hidden states (b, n, width)."""
        x = self.model.embed(tokens.to(self.device), embedding_manager)
        stop = -1 if self.layer == "penultimate" else None
        return self.model.ln_final(self.model.transformer(x, stop=stop))

    def forward(self, text, embedding_manager=None):
        return self.encode_tokens(self.tokenize(text), embedding_manager=embedding_manager)

    def encode(self, text, **kwargs):
        return self(text, **kwargs)


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's second text encoder (Stability's generative-models class name and config keys).

    legacy=True behaves as FrozenOpenCLIPEmbedder (ln_final of the chosen layer). legacy=False, as SDXL's
    configs set it, returns the chosen layer's raw hidden states, without ln_final; "pooled" is ln_final of the
    last layer at the end token @ text_projection (b, embed_dim). always_return_pooled (needs legacy=False)
    returns (hidden states, pooled): SDXL uses the penultimate states for cross-attention and the pooled vector
    in its ADM conditioning.
    """

    LAYERS = ("pooled", "last", "penultimate")
    embedding_key = "clip_g"

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device=None, max_length=77, freeze=True,
                 layer="last", always_return_pooled=False, legacy=True, config=None):
        if legacy and (always_return_pooled or layer == "pooled"):
            raise ValueError(f"{type(self).__name__}: the pooled output (layer 'pooled' or always_return_pooled) "
                             "needs legacy: False, as in SDXL's configs.")
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze,
                         layer=layer, config=config)
        self.legacy = legacy
        self.return_pooled = always_return_pooled

    def encode_tokens(self, tokens, embedding_manager=None):
        if self.legacy:
            return super().encode_tokens(tokens, embedding_manager)
        tokens = tokens.to(self.device)
        penultimate = self.model.transformer(self.model.embed(tokens, embedding_manager), stop=-1)
        if self.layer == "penultimate" and not self.return_pooled:
            return penultimate
        last = self.model.transformer(penultimate, start=self.model.num_layers - 1)
        # The end token's position after the manager's splicing (several vectors per placeholder move it).
        spliced = getattr(embedding_manager, "spliced_token_ids", None)
        pooled = self.model.pool(last, tokens if spliced is None else spliced(tokens))
        outputs = {"penultimate": penultimate, "last": last, "pooled": pooled}
        return (outputs[self.layer], outputs["pooled"]) if self.return_pooled else outputs[self.layer]
