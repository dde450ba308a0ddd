"""The part of lucidrains' x-transformers that LDM's text encoders use.

A pre-norm transformer encoder with an absolute positional embedding. Module and parameter names
follow the original so LDM-1.4B checkpoints load unchanged:
token_emb.weight, pos_emb.emb.weight, attn_layers.layers.{i}.0 (LayerNorm), attn_layers.layers.{i}.1
(attention: to_q, to_k, to_v, to_out; or feed-forward: net.0.0, net.2), norm, to_logits.
Layer i is attention for even i and feed-forward for odd i.
"""
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim, max_seq_len):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim_out or dim),
        )

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention (bias-free projections, as in x-transformers)."""

    def __init__(self, dim, dim_head=DEFAULT_DIM_HEAD, heads=8, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class AttentionLayers(nn.Module):
    """`depth` blocks of (pre-norm self-attention, pre-norm feed-forward), each with a residual connection."""

    def __init__(self, dim, depth, heads=8, attn_dim_head=DEFAULT_DIM_HEAD, attn_dropout=0.0,
                 ff_mult=4, ff_dropout=0.0):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                nn.LayerNorm(dim), Attention(dim, dim_head=attn_dim_head, heads=heads, dropout=attn_dropout)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, mult=ff_mult, dropout=ff_dropout)]))

    def forward(self, x):
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class Encoder(AttentionLayers):
    """Bidirectional attention layers (the only kind LDM's text encoders use)."""


class TransformerWrapper(nn.Module):
    def __init__(self, *, num_tokens, max_seq_len, attn_layers, emb_dim=None, emb_dropout=0.0, use_pos_emb=True):
        super().__init__()
        dim = attn_layers.dim
        emb_dim = emb_dim or dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, x, return_embeddings=False, embedding_manager=None):
        """Token ids (b, n) -> logits (b, n, num_tokens), or the final hidden states with return_embeddings.

        `embedding_manager` rewrites the token embeddings (textual inversion) before positions are added.
        """
        tokens = x
        x = self.token_emb(tokens)
        if embedding_manager is not None:
            x = embedding_manager(tokens, x)
        if self.pos_emb is not None:
            x = x + self.pos_emb(x)
        x = self.project_emb(self.emb_dropout(x))
        x = self.norm(self.attn_layers(x))
        return x if return_embeddings else self.to_logits(x)
