"""Cross-attention and the spatial transformer that conditions the UNet on text.

Module and parameter names follow the original (CompVis) layout so official checkpoints load unchanged:
`attn1`/`attn2` with `to_q`, `to_k`, `to_v`, `to_out.0`; `ff.net.0.proj`, `ff.net.2`; `norm1..3`;
and in `SpatialTransformer`: `norm`, `proj_in`, `transformer_blocks.N`, `proj_out`.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.util import default


class GEGLU(nn.Module):
    """Gated GELU: one projection yields both the values and their gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when no context is given)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        """x: (b, n, query_dim); context: (b, m, context_dim); mask: (b, m...) booleans, True = may attend."""
        context = default(context, x)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if mask is not None:
            mask = rearrange(mask, "b ... -> b 1 1 (...)").bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, then a gated feed-forward, each pre-normed and residual."""

    def __init__(self, dim, n_heads, d_head, dropout=0., context_dim=None, gated_ff=True, checkpoint=True,
                 disable_self_attn=False):
        super().__init__()
        # Stability's `disable_self_attn`: the first attention also attends to the context instead of to `x`.
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=dim, context_dim=context_dim if disable_self_attn else None,
                                    heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image feature map, conditioned on `context`.

    Projects (b, c, h, w) to (b, h*w, inner_dim), runs `depth` transformer blocks and projects back.
    `proj_out` starts at zero so that a fresh block is the identity. `use_checkpoint` (not in the
    original's signature, which always asked its blocks to checkpoint) lets the UNet's
    `use_checkpoint` switch reach the transformer blocks.
    `use_linear` (SD 2.x, SDXL): `proj_in`/`proj_out` are `nn.Linear` on (b, h*w, c) after the norm, not 1x1
    convs; the same map with 2-D weights, as in those checkpoints. `disable_self_attn`: see BasicTransformerBlock.
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0., context_dim=None, use_checkpoint=True,
                 use_linear=False, disable_self_attn=False):
        super().__init__()
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  checkpoint=use_checkpoint, disable_self_attn=disable_self_attn)
            for _ in range(depth)
        ])
        self.proj_out = zero_module(nn.Linear(inner_dim, in_channels) if use_linear
                                    else nn.Conv2d(inner_dim, in_channels, 1))
        self.layer_index = None  # this layer's place among the UNet's cross-attention layers (diffusionmodules.layer_contexts)

    def forward(self, x, context=None):
        if context is not None and context.ndim == 4:  # one context per cross-attention layer (XTI): take ours
            context = context[:, self.layer_index]
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        # Back in the caller's memory format: a channels-last tensor leaking into an NCHW UNet makes every later
        # convolution re-lay-out its weight on each call (a quarter of the UNet's time before this).
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def memory_format_of(x):
    """channels_last for an NHWC-strided 4-D tensor (a UNet converted with `to(memory_format=...)`), else NCHW."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class LinearAttention(nn.Module):
    """Attention linear in the number of pixels (softmax over keys first); the autoencoder's `attn_type="linear"`."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        _, _, h, w = x.shape
        q, k, v = rearrange(self.to_qkv(x), "b (qkv heads c) h w -> qkv b heads c (h w)", heads=self.heads, qkv=3)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(rearrange(out, "b heads c (h w) -> b (heads c) h w", heads=self.heads, h=h, w=w))
