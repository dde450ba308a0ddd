"""SDXL's first text encoder: CLIP ViT-L/14's hidden state after `layer_idx` layers, without the final LayerNorm.

Stability's generative-models builds it as `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)`: the penultimate
layer's output of the 12-layer tower (transformers' `hidden_states[11]`, i.e. `hidden_states[-2]`). Here it is
our FrozenCLIPEmbedder with one more `__get__`-rebound forward: the text transformer runs the embeddings (which
thread the embedding manager, as in SD v1) and then only the first `layer_idx` layers. The remaining layers and
the final LayerNorm stay in the module, so the official `conditioner.embedders.0.transformer.text_model.*` keys
load and save unchanged.

Its own module, not open_clip.py: modules.py re-exports the OpenCLIP encoders at its end, and this class
subclasses one of modules.py's, so importing it from there would be circular.
"""
import inspect

from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from ldm.modules.encoders.modules import CLIP_VIT_L14, FrozenCLIPEmbedder


def _causal_layers_5x(text_transformer, hidden_states, layers):
    from transformers.masking_utils import create_causal_mask
    # None for SDPA (it then uses its fused causal path); an explicit mask for eager attention.
    mask = create_causal_mask(config=text_transformer.config, inputs_embeds=hidden_states,
                              attention_mask=None, cache=None)
    for layer in layers:
        hidden_states = layer(hidden_states, mask, is_causal=True)
    return hidden_states


def _causal_layers_4x(text_transformer, hidden_states, layers):
    from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask
    mask = _create_4d_causal_attention_mask(hidden_states.shape[:2], hidden_states.dtype, device=hidden_states.device)
    for layer in layers:
        hidden_states = layer(hidden_states, None, mask)[0]
    return hidden_states


# transformers 4.x layers take a separate causal mask and return tuples; 5.x layers take is_causal.
_LAYERS_TAKE_CAUSAL_MASK = "causal_attention_mask" in inspect.signature(CLIPEncoderLayer.forward).parameters
_run_causal_layers = _causal_layers_4x if _LAYERS_TAKE_CAUSAL_MASK else _causal_layers_5x


def _hidden_state_forward(self, input_ids=None, position_ids=None, inputs_embeds=None, embedding_manager=None):
    """Hidden state (b, n, d) after the first `_hidden_layer_idx` layers of the causal text transformer."""
    hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                    embedding_manager=embedding_manager)
    return _run_causal_layers(self, hidden_states, self.encoder.layers[:self._hidden_layer_idx])


class FrozenCLIPEmbedderHidden(FrozenCLIPEmbedder):
    """CLIP's text transformer returning the hidden state after `layer_idx` layers (SDXL: 11 of 12), no final norm.

    layer: only "hidden" (Stability's config key, kept so SDXL's `params` carry over); the last layer with its
    final LayerNorm is FrozenCLIPEmbedder itself. Other arguments as FrozenCLIPEmbedder.
    """

    embedding_key = "clip_l"

    def __init__(self, version=CLIP_VIT_L14, device=None, max_length=77, freeze=True, config=None, layer="hidden",
                 layer_idx=11):
        if layer != "hidden":
            raise ValueError(f"FrozenCLIPEmbedderHidden: layer must be 'hidden', not {layer!r}; "
                             "use FrozenCLIPEmbedder for the last layer.")
        super().__init__(version=version, device=device, max_length=max_length, freeze=freeze, config=config)
        num_layers = self.transformer.config.num_hidden_layers
        if not 0 <= layer_idx <= num_layers:
            raise ValueError(f"FrozenCLIPEmbedderHidden: layer_idx {layer_idx} is outside 0..{num_layers} "
                             "(the number of layers run).")
        self.layer_idx = layer_idx
        text_transformer = self.text_model
        text_transformer._hidden_layer_idx = layer_idx
        text_transformer.forward = _hidden_state_forward.__get__(text_transformer)
