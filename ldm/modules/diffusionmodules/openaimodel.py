"""The diffusion UNet (after OpenAI's guided-diffusion, as used by latent diffusion and Stable Diffusion).

Submodule names and order reproduce the official state-dict layout (`time_embed.0/2`, `input_blocks.N.M`,
`middle_block.0/1/2`, `output_blocks.N.M`, `out.0/2`) so that original checkpoints load unchanged.
"""
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.layer_contexts import check_layer_contexts, number_cross_attention_layers
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


def compute_layers(module):
    """The layers that carry the compute (convs, linears); norms stay float32 for stability."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def norm_layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embeddings `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential that hands the timestep embedding and the text context to the children that take them."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution. 3-D signals upsample only H, W."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by average pooling. 3-D signals downsample only H, W."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a convolution cannot change the number of channels.")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (`up`/`down`) on the way."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        # With scale-shift norm the embedding yields a scale and a shift, hence twice the channels.
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the activation and the convolution, the skip path alongside.
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions of a feature map (the UNet's attention without text)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def _attend(q, k, v):
    """q, k, v: (batch*heads, channels, length) -> (batch*heads, channels, length)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class QKVAttentionLegacy(nn.Module):
    """Attention over a (batch, heads * 3 * ch, length) tensor laid out head by head, then q, k, v."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attend(q, k, v).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Attention over a (batch, 3 * heads * ch, length) tensor laid out q, k, v, then head by head."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _attend(q, k, v).reshape(bs, -1, length)


class UNetModel(nn.Module):
    """The full UNet with timestep embedding and, with `use_spatial_transformer`, cross-attention to `context`.

    :param attention_resolutions: downsampling rates (1, 2, 4, ...) at which attention is applied.
    :param num_heads / num_head_channels: a fixed number of heads, or a fixed width per head (one must be -1).
    :param num_classes: class-conditional when set (`y` labels in forward); `"sequential"` (SDXL): `y` is an
        (N, adm_in_channels) vector embedded by an MLP (`label_emb.0.0`, `label_emb.0.2`) and added to the time
        embedding.
    :param use_checkpoint: recompute activations in backward to save memory.
    :param use_fp16: run the torso (input, middle and output blocks) in half precision.
    :param context_dim: width of the text context for cross-attention (an int, or Stability's list of equal ints).
    :param transformer_depth: transformer blocks per SpatialTransformer: an int, or one per level (SDXL); the
        middle block uses the last level's.
    :param use_linear_in_transformer: linear `proj_in`/`proj_out` in the transformers (SD 2.x, SDXL).
    :param adm_in_channels: width of `y` for `num_classes: "sequential"`.
    :param disable_self_attentions: per level, whether the first attention of each block attends to the context.
    :param disable_middle_self_attn: the same for the middle block.
    :param spatial_transformer_attn_type: Stability's attention backend choice; both run through
        `scaled_dot_product_attention` here.
    :param n_embed: predict codebook ids of a VQ first stage instead of the noise.
    :param legacy: the original's head-width rule (kept so that old configs build the same network).
    :param position_input: add a learned projection of each pixel's coordinates to the first block's features
        (`position_embed`; a checkpoint without it is loaded with it in `ignore_keys`). Not in the original:
        a convolutional UNet knows where it is only from its zero padding, too weakly for a small model to learn
        words such as "on the left" (docs/toy_model.md, world v2).
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, n_embed=None, legacy=True, use_linear_in_transformer=False, adm_in_channels=None,
                 disable_self_attentions=None, disable_middle_self_attn=False,
                 spatial_transformer_attn_type="softmax", position_input=False):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the width of the conditioning).")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is only used by the spatial transformer: set use_spatial_transformer.")
        context_dim = _one_context_dim(context_dim)
        transformer_depth = _per_level("transformer_depth", transformer_depth, channel_mult)
        disable_self_attentions = _per_level("disable_self_attentions", disable_self_attentions or False,
                                             channel_mult)
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise ValueError(f"spatial_transformer_attn_type {spatial_transformer_attn_type!r} is not supported: "
                             "use 'softmax' (or 'softmax-xformers', the same attention here).")
        if (num_classes == "sequential") != (adm_in_channels is not None):
            raise ValueError('adm_in_channels goes with num_classes: "sequential" (both or neither).')
        if isinstance(num_classes, str) and num_classes != "sequential":
            raise ValueError(f'num_classes must be an integer or "sequential", got {num_classes!r}.')
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels.")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None

        def resblock(ch, out_ch, **updown):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **updown)

        def attention(ch, heads_without_text=num_heads, depth=transformer_depth[-1],
                      disable_self_attn=disable_middle_self_attn):
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if use_spatial_transformer:
                if legacy:
                    dim_head = ch // heads
                return SpatialTransformer(ch, heads, dim_head, depth=depth, context_dim=context_dim,
                                          use_checkpoint=use_checkpoint, use_linear=use_linear_in_transformer,
                                          disable_self_attn=disable_self_attn)
            # The legacy rule hands AttentionBlock the configured head width (which may be -1: use the head count).
            return AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=heads_without_text,
                                  num_head_channels=num_head_channels if legacy else dim_head,
                                  use_new_attention_order=use_new_attention_order)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(
                linear(adm_in_channels, time_embed_dim),
                nn.SiLU(),
                linear(time_embed_dim, time_embed_dim),
            ))
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))
        ])
        input_block_chans = [model_channels]
        # Not zero-initialised: a zero start left "on the left" unlearned after 500 steps (docs/toy_model.md).
        self.position_embed = conv_nd(dims, 4 * dims, model_channels, 1) if position_input else None
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, depth=transformer_depth[level],
                                            disable_self_attn=disable_self_attentions[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, heads_without_text=num_heads_upsample, depth=transformer_depth[level],
                                            disable_self_attn=disable_self_attentions[level]))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))
        if use_fp16:
            self.convert_to_fp16()
        self.cross_attention_layer_names = number_cross_attention_layers(self)

    def _torso(self):
        return self.input_blocks, self.middle_block, self.output_blocks

    def convert_torso(self, dtype, norms=False):
        """Store the torso's convs and linears in `dtype` and run the torso in it (norms stay float32).

        For a frozen UNet under bf16/fp16 autocast this removes the cast of every weight on every call (autocast
        caches casts only for weights that require grad) and halves the weights' memory. `norms` (bf16 sampling):
        the group and layer norms too, so that no activation is cast to float32 and back around each norm; the
        torso then computes what diffusers' UNet cast to bf16 computes (the norms' statistics are still
        accumulated in float32 by PyTorch's kernels).
        """
        for part in self._torso():
            for layer in compute_layers(part) + (norm_layers(part) if norms else []):
                layer.to(dtype)
        self.dtype = dtype

    def convert_to_fp16(self):
        self.convert_torso(torch.float16)

    def convert_to_fp32(self):
        self.convert_torso(torch.float32)

    def forward(self, x, timesteps=None, context=None, y=None):
        """
        :param x: (N, C, ...) noisy inputs.
        :param timesteps: (N,) timesteps.
        :param context: (N, L, context_dim) conditioning for cross-attention, or (N, layers, L, context_dim): one
            context per cross-attention layer, in the order of `cross_attention_layer_names` (XTI, layer_contexts).
        :param y: (N,) class labels, if class-conditional; (N, adm_in_channels) for `num_classes: "sequential"`.
        :return: (N, out_channels, ...) outputs (or codebook logits with n_embed).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) exactly when the model is class-conditional (num_classes).")
        if isinstance(context, (list, tuple)):
            raise TypeError("context must be one tensor (N, L, context_dim); per-block context lists are not supported.")
        # the sinusoid is float32; cast it to the embedding MLP's dtype so a model cast to half runs
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            expected = (x.shape[0], self.label_emb[0][0].in_features) if self.num_classes == "sequential" \
                else (x.shape[0],)
            if tuple(y.shape) != expected:
                raise ValueError(f"y must have shape {expected}, got {tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.dtype) if self.num_classes == "sequential" else y)

        h = x.type(self.dtype)
        emb = emb.type(self.dtype)
        if context is not None:
            check_layer_contexts(context, self.cross_attention_layer_names)
            context = context.type(self.dtype)
        h = self.input_blocks[0](h, emb, context)
        if self.position_embed is not None:
            h = h + self.position_embed(coordinate_features(h).to(self.position_embed.weight.dtype)).to(h.dtype)
        hs = [h]
        for module in self.input_blocks[1:]:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        h = h.type(x.dtype)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)


def coordinate_features(h):
    """(1, 4 * dims, *spatial) features of each position of `h`: per axis the coordinate in [-1, 1] (pixel
    centres), and its sine and cosine at half a period per image, and its absolute value."""
    axes = [torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=h.device, dtype=h.dtype) for n in h.shape[2:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    features = [f for g in grids for f in (g, torch.sin(g * torch.pi / 2), torch.cos(g * torch.pi / 2), g.abs())]
    return torch.stack(features)[None]


def _one_context_dim(context_dim):
    """Stability's configs may give context_dim as a list (one per transformer block); one width is supported."""
    if not isinstance(context_dim, Sequence):
        return context_dim
    widths = set(context_dim)
    if len(widths) != 1:
        raise ValueError(f"context_dim {list(context_dim)!r}: contexts of different widths per block are not "
                         "supported; give one integer.")
    return widths.pop()


def _per_level(name, value, channel_mult):
    """An int/bool for every level, or a list with one entry per level of channel_mult."""
    if not isinstance(value, Sequence):
        return [value] * len(channel_mult)
    if len(value) != len(channel_mult):
        raise ValueError(f"{name} {list(value)!r} needs one entry per level of channel_mult "
                         f"({len(channel_mult)}), or one value for all.")
    return list(value)
