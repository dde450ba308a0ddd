"""SDXL's conditioner: Stability's `GeneralConditioner` (generative-models) with its class names and config layout.

A list of embedders (`emb_models`: `{is_trainable, input_key, ucg_rate, target, params}`), each reading one key
of the batch; an output's rank decides where it goes (2: "vector", 3: "crossattn", 4/5: "concat") and outputs
of one kind are concatenated in embedder order (vector and concat on dim 1, crossattn on the feature dim 2).
SDXL base lists CLIP-L (hidden layer 11, 768), OpenCLIP bigG (penultimate 1280 and pooled 1280) and three
`ConcatTimestepEmbedderND(outdim=256)` for original_size_as_tuple, crop_coords_top_left and
target_size_as_tuple, so "crossattn" is (b, 77, 768 + 1280 = 2048) and "vector" (b, 1280 + 3 * 512 = 2816), the
UNet's `adm_in_channels`. Under `conditioner.embedders.N.*` the text encoders keep the official checkpoint keys.

Textual inversion: `forward(batch, embedding_manager=...)` takes a MultiEmbeddingManager (or an EmbeddingManager
for a model with one text encoder) and gives each text encoder its own manager.
"""
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.base import TextEncoder
from ldm.util import freeze, instantiate_from_config

OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}


class ConcatTimestepEmbedderND(nn.Module):
    """Each number of a (b, k) batch (or (b,)) as a sinusoidal embedding of `outdim`, concatenated: (b, k * outdim).

    The embedding is the diffusion timestep's (cos half, then sin half; frequencies 10000^(-i / (outdim / 2))),
    i.e. diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0. No parameters.
    """

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x[:, None]
        b, k = x.shape
        return timestep_embedding(x.reshape(b * k), self.outdim).reshape(b, k * self.outdim)


class GeneralConditioner(nn.Module):
    """The embedders of `emb_models` over a batch dict; returns {"crossattn", "vector", "concat"} as present."""

    def __init__(self, emb_models):
        super().__init__()
        embedders = []
        for n, config in enumerate(emb_models):
            embedder = instantiate_from_config(config)
            embedder.is_trainable = bool(config.get("is_trainable", False))
            embedder.ucg_rate = float(config.get("ucg_rate", 0.0))
            embedder.legacy_ucg_val = config.get("legacy_ucg_val", None)
            if "input_key" in config:
                embedder.input_keys = (config["input_key"],)
            elif "input_keys" in config:
                embedder.input_keys = tuple(config["input_keys"])
            else:
                raise ValueError(f"GeneralConditioner: emb_models[{n}] ({config.get('target')}) needs input_key or "
                                 "input_keys, the batch key(s) it reads.")
            embedders.append(embedder if embedder.is_trainable else freeze(embedder))
        self.embedders = nn.ModuleList(embedders)

    @property
    def text_encoders(self):
        """The embedders that are text encoders (take an embedding manager), in order."""
        return [embedder for embedder in self.embedders if isinstance(embedder, TextEncoder)]

    def _text_with_legacy_ucg(self, embedder, text):
        """With legacy_ucg_val, each caption is replaced by it with probability ucg_rate (Stability's legacy mode)."""
        drop = torch.bernoulli(torch.full((len(text),), embedder.ucg_rate)).bool().tolist()
        return [embedder.legacy_ucg_val if d else t for t, d in zip(text, drop)]

    def _embed(self, embedder, batch, embedding_manager):
        inputs = [batch[key] for key in embedder.input_keys]
        if embedder.legacy_ucg_val is not None and embedder.ucg_rate > 0:
            inputs = [self._text_with_legacy_ucg(embedder, inputs[0])] + inputs[1:]
        if embedding_manager is not None and isinstance(embedder, TextEncoder):
            return embedder(*inputs, embedding_manager=embedding_manager.manager_for(embedder))
        with torch.set_grad_enabled(embedder.is_trainable and torch.is_grad_enabled()):
            return embedder(*inputs)

    def forward(self, batch, force_zero_embeddings=(), embedding_manager=None):
        """Conditioning of `batch`; embedders reading a key in `force_zero_embeddings` give zeros (the SDXL
        negative prompt when none is given). An embedder with ucg_rate > 0 (and no legacy_ucg_val) zeroes each
        sample's output with that probability (classifier-free-guidance dropout, as Stability's)."""
        output = {}
        for embedder in self.embedders:
            outs = self._embed(embedder, batch, embedding_manager)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            for emb in outs:
                key = OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0 and embedder.legacy_ucg_val is None:
                    keep = torch.bernoulli(torch.full((emb.shape[0],), 1 - embedder.ucg_rate, device=emb.device))
                    emb = emb * keep.view(-1, *[1] * (emb.dim() - 1)).to(emb.dtype)
                if any(k in force_zero_embeddings for k in embedder.input_keys):
                    emb = torch.zeros_like(emb)
                output[key] = emb if key not in output else torch.cat([output[key], emb], dim=KEY2CATDIM[key])
        return output

    def get_unconditional_conditioning(self, batch_c, batch_uc=None, force_uc_zero_embeddings=(),
                                       embedding_manager=None):
        """(c, uc) for sampling, without ucg dropout; uc from batch_uc (default batch_c) with the keys of
        force_uc_zero_embeddings zeroed."""
        rates = [embedder.ucg_rate for embedder in self.embedders]
        for embedder in self.embedders:
            embedder.ucg_rate = 0.0
        try:
            c = self(batch_c, embedding_manager=embedding_manager)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings, embedding_manager)
        finally:
            for embedder, rate in zip(self.embedders, rates):
                embedder.ucg_rate = rate
        return c, uc
