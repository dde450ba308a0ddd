"""Per-layer text contexts (extended textual inversion, XTI / P+): one context per cross-attention layer.

A per-layer context is one tensor (batch, layers, tokens, width); the UNet numbers its SpatialTransformers in
module order (input blocks, middle block, output blocks), each takes its own slice `context[:, layer_index]`.
Layer names follow kohya-ss/sd-scripts: "IN01" (the transformer in input_blocks[1]), "MID", "OUT03".
The UNet, the conditioning helpers and the XTI manager share these; none of them needs the others.
"""
from ldm.modules.attention import SpatialTransformer


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
