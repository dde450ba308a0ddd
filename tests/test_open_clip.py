"""SD 2.x / SDXL text encoders and the text-encoder interface.

Parity is checked against transformers' CLIP text models filled by diffusers' own converters from our weights
exported under the official keys, so both the architecture and the key layout are checked by code we did not write.
"""
import pytest
import safetensors.torch
import torch
from conftest import build_tiny_model
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from omegaconf import OmegaConf
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.base import TextEncoder, embedding_key
from ldm.modules.encoders.clip_hidden import FrozenCLIPEmbedderHidden
from ldm.modules.encoders.modules import (
    BERTEmbedder, ClassEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2,
)
from ldm.util import instantiate_from_config

SD2_PREFIX = "cond_stage_model.model."
SDXL_G_PREFIX = "conditioner.embedders.1.model."
SDXL_L_PREFIX = "conditioner.embedders.0."
STAR = 265  # "*" in the CLIP BPE vocabulary
PROMPTS = ["a photo of *", "A  Photo OF * in the style of *", "a red square " * 30]
TINY_G = dict(width=32, layers=3, heads=4, embed_dim=24)  # embed_dim != width catches a transposed projection
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def randomize(module, seed):
    """Random values in every parameter (LayerNorms and biases included), so parity covers them all."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return module


def hf_text_config(width, layers, heads, projection_dim, act="gelu"):
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                          projection_dim=projection_dim, bos_token_id=49406, eos_token_id=49407,
                          attn_implementation="eager")


def load_converted(model, converted):
    """Load a diffusers-converted dict as diffusers does: without `text_model.` where the class is flat."""
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True)
    return model.eval()


def official(encoder, prefix):
    return {prefix + k.removeprefix("model."): v for k, v in encoder.state_dict().items()}


def count(module, skip=()):
    return sum(p.numel() for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] not in skip)


@pytest.fixture(scope="module")
def sd2_tiny():
    # 24 layers like ViT-H, so diffusers' SD 2.x converter drops the last block (resblocks.23) as for the real model.
    return randomize(FrozenOpenCLIPEmbedder(layer="penultimate", config=dict(width=16, layers=24, heads=2)), 0)


@pytest.fixture(scope="module")
def sdxl_g_tiny():
    return randomize(FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False,
                                             config=TINY_G), 1)


@pytest.fixture(scope="module")
def sdxl_l_tiny():
    return randomize(FrozenCLIPEmbedderHidden(config=TINY_CLIP, layer_idx=2), 2)


# ---------------------------------------------------------------- (a) parity through diffusers' converters

@torch.no_grad()
def test_sd2_penultimate_matches_diffusers_sd2_text_encoder(sd2_tiny):
    """diffusers' SD 2.x text encoder is a 23-layer CLIPTextModel: its last_hidden_state (after the final norm)
    is our `layer: penultimate`."""
    hf = CLIPTextModel(hf_text_config(16, 23, 2, 16))
    converted = convert_open_clip_checkpoint(hf, official(sd2_tiny, SD2_PREFIX), prefix=SD2_PREFIX)
    assert not any("layers.23." in k or "projection" in k for k in converted)
    load_converted(hf, converted)
    tokens = sd2_tiny.tokenize(PROMPTS)
    torch.testing.assert_close(sd2_tiny.encode_tokens(tokens), hf(input_ids=tokens).last_hidden_state,
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_sd2_last_layer_matches_full_depth_clip_text_model(sd2_tiny):
    sd = official(sd2_tiny, SD2_PREFIX)
    hf = CLIPTextModel(hf_text_config(16, 24, 2, 16))
    converted = convert_open_clip_checkpoint(hf, sd, prefix=SD2_PREFIX)
    # The converter skips the 24th block by name (SD 2.x never runs it); convert it through a renamed prefix.
    block_23 = {k.replace(SD2_PREFIX, "x."): v for k, v in sd.items() if ".resblocks.23." in k}
    converted.update(convert_open_clip_checkpoint(hf, block_23, prefix="x."))
    load_converted(hf, converted)
    last = FrozenOpenCLIPEmbedder(layer="last", config=dict(width=16, layers=24, heads=2))
    last.load_state_dict(sd2_tiny.state_dict())
    tokens = last.tokenize(PROMPTS)
    out = hf(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(last.encode_tokens(tokens), out.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(sd2_tiny.encode_tokens(tokens), hf.final_layer_norm(out.hidden_states[-2]),
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_sdxl_bigg_penultimate_and_pooled_match_clip_text_model_with_projection(sdxl_g_tiny):
    """SDXL's second encoder in diffusers: hidden_states[-2] (no final norm) and text_embeds (pooled, projected)."""
    hf = CLIPTextModelWithProjection(hf_text_config(32, 3, 4, 24))
    load_converted(hf, convert_open_clip_checkpoint(hf, official(sdxl_g_tiny, SDXL_G_PREFIX), prefix=SDXL_G_PREFIX))
    tokens = sdxl_g_tiny.tokenize(PROMPTS)
    hidden, pooled = sdxl_g_tiny.encode_tokens(tokens)
    out = hf(input_ids=tokens, output_hidden_states=True)
    assert hidden.shape == (3, 77, 32) and pooled.shape == (3, 24)
    torch.testing.assert_close(hidden, out.hidden_states[-2], rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=1e-5)


@torch.no_grad()
def test_sdxl_bigg_other_layers_and_legacy_mode(sdxl_g_tiny):
    hf = CLIPTextModelWithProjection(hf_text_config(32, 3, 4, 24))
    load_converted(hf, convert_open_clip_checkpoint(hf, official(sdxl_g_tiny, SDXL_G_PREFIX), prefix=SDXL_G_PREFIX))
    tokens = sdxl_g_tiny.tokenize(PROMPTS)
    out = hf(input_ids=tokens, output_hidden_states=True)
    variants = {
        dict_key: FrozenOpenCLIPEmbedder2(config=TINY_G, **kwargs) for dict_key, kwargs in {
            "last_raw": dict(layer="last", legacy=False),
            "pooled": dict(layer="pooled", legacy=False),
            "legacy_penultimate": dict(layer="penultimate"),
        }.items()}
    for encoder in variants.values():
        encoder.load_state_dict(sdxl_g_tiny.state_dict())
    final_norm = hf.text_model.final_layer_norm
    torch.testing.assert_close(variants["last_raw"].encode_tokens(tokens), out.hidden_states[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(variants["pooled"].encode_tokens(tokens), out.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(variants["legacy_penultimate"].encode_tokens(tokens),
                               final_norm(out.hidden_states[-2]), rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("layer_idx, attn", [(2, "sdpa"), (2, "eager"), (3, "sdpa")])
def test_sdxl_clip_l_hidden_layer_matches_clip_text_model_hidden_states(sdxl_l_tiny, layer_idx, attn):
    """Stability's FrozenCLIPEmbedder(layer="hidden", layer_idx=11) is transformers' hidden_states[11] (= [-2])."""
    encoder = FrozenCLIPEmbedderHidden(config={**TINY_CLIP, "attn_implementation": attn}, layer_idx=layer_idx)
    encoder.load_state_dict(sdxl_l_tiny.state_dict())
    sd = {SDXL_L_PREFIX + k: v for k, v in encoder.state_dict().items()}
    assert SDXL_L_PREFIX + "transformer.text_model.encoder.layers.2.mlp.fc2.weight" in sd  # all layers kept: keys unchanged
    hf = load_converted(CLIPTextModel(encoder.transformer.config), convert_ldm_clip_checkpoint(sd))
    tokens = encoder.tokenize(PROMPTS)
    out = hf(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(encoder.encode_tokens(tokens), out.hidden_states[layer_idx], rtol=0, atol=1e-5)
    if layer_idx == 2:
        torch.testing.assert_close(encoder(PROMPTS), out.hidden_states[-2], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- (b) full-size parameter counts (meta device)

# The encoders' `target`/`params` in Stability's configs: stablediffusion's v2-inference.yaml and
# generative-models' sd_xl_base.yaml (its first encoder is sgm's FrozenCLIPEmbedder; ours is in clip_hidden).
SD2_COND_STAGE = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                  "params": {"freeze": True, "layer": "penultimate"}}
SDXL_EMBEDDER_0 = {"target": "ldm.modules.encoders.clip_hidden.FrozenCLIPEmbedderHidden",
                   "params": {"layer": "hidden", "layer_idx": 11}}
SDXL_EMBEDDER_1 = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                   "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                              "layer": "penultimate", "always_return_pooled": True, "legacy": False}}


def test_vit_h_text_tower_parameter_count_on_meta_device():
    with torch.device("meta"):
        ours = instantiate_from_config(SD2_COND_STAGE)
        reference = CLIPTextModel(hf_text_config(1024, 24, 16, 1024))
    # "24 layers + embeddings + final LayerNorm": text_projection and logit_scale are CLIP heads, not the tower;
    # a CLIPTextModel has neither. SD 2.x uses neither, but both are in its checkpoint, so we hold them.
    assert count(ours, skip=("text_projection", "logit_scale")) == 352_984_064 == count(reference)
    assert count(ours) == 352_984_064 + 1024 * 1024 + 1
    assert ours.embedding_dim == 1024 and ours.model.num_layers == 24 and ours.layer == "penultimate"


def test_vit_bigg_text_tower_parameter_count_on_meta_device():
    with torch.device("meta"):
        ours = instantiate_from_config(SDXL_EMBEDDER_1)
        reference = CLIPTextModelWithProjection(hf_text_config(1280, 32, 20, 1280))
    # CLIPTextModelWithProjection includes text_projection (no bias); logit_scale is the only extra scalar.
    assert count(ours, skip=("logit_scale",)) == 694_659_840 == count(reference)
    assert ours.embedding_dim == 1280 and ours.model.num_layers == 32
    assert ours.model.transformer.resblocks[0].attn.heads == 20


def test_sdxl_clip_l_keeps_the_whole_vit_l_tower():
    with torch.device("meta"):
        ours = instantiate_from_config(SDXL_EMBEDDER_0)
    assert count(ours) == 123_060_480 and ours.layer_idx == 11
    assert ours.transformer.config.hidden_act == "quick_gelu"


def test_gelu_not_quick_gelu():
    block = FrozenOpenCLIPEmbedder(config=TINY_G).model.transformer.resblocks[0]
    assert type(block.mlp.gelu) is nn.GELU and block.mlp.gelu.approximate == "none"


# ---------------------------------------------------------------- (c) official key layout and round trips

def vit_h_official_keys():
    keys = {"positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
            "ln_final.weight", "ln_final.bias"}
    for n in range(24):
        for name in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"transformer.resblocks.{n}.{name}.weight", f"transformer.resblocks.{n}.{name}.bias"}
        keys |= {f"transformer.resblocks.{n}.attn.in_proj_weight", f"transformer.resblocks.{n}.attn.in_proj_bias"}
    return keys


def test_official_key_layout_and_shapes_on_meta_device():
    with torch.device("meta"):
        sd = FrozenOpenCLIPEmbedder().state_dict()
    assert set(sd) == {"model." + k for k in vit_h_official_keys()}  # cond_stage_model.model.* inside LDM
    shapes = {"model.positional_embedding": (77, 1024), "model.text_projection": (1024, 1024),
              "model.logit_scale": (), "model.token_embedding.weight": (49408, 1024),
              "model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
              "model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_load_round_trip_is_identical(tmp_path, sdxl_g_tiny, fmt):
    path = tmp_path / f"text.{fmt}"
    sd = official(sdxl_g_tiny, SDXL_G_PREFIX)
    if fmt == "pt":
        torch.save({"state_dict": sd}, path)
        loaded = torch.load(path, weights_only=True)["state_dict"]
    else:
        safetensors.torch.save_file(sd, path)
        loaded = safetensors.torch.load_file(path)
    fresh = FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False, config=TINY_G)
    fresh.load_state_dict({"model." + k.removeprefix(SDXL_G_PREFIX): v for k, v in loaded.items()}, strict=True)
    again = official(fresh, SDXL_G_PREFIX)
    assert list(again) == list(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    tokens = fresh.tokenize(PROMPTS)
    for a, b in zip(fresh.encode_tokens(tokens), sdxl_g_tiny.encode_tokens(tokens)):
        assert torch.equal(a, b)


def test_frozen_by_default_and_trainable_on_request():
    frozen = FrozenOpenCLIPEmbedder(config=TINY_G)
    assert not frozen.model.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = FrozenOpenCLIPEmbedder(config=TINY_G, freeze=False)
    assert all(p.requires_grad for p in trainable.parameters())


# ---------------------------------------------------------------- (d) tokenizer and embedding manager

def test_tokenize_as_openclip_pads_with_zero():
    encoder = FrozenOpenCLIPEmbedder(config=TINY_G)
    tokens = encoder.tokenize(PROMPTS)
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    assert tokens[0, :6].tolist() == [49406, 320, 1125, 539, STAR, 49407]
    assert (tokens[0, 6:] == 0).all()
    # lower-cased and whitespace-cleaned like OpenCLIP's tokenizer
    assert tokens[1, :5].tolist() == tokens[0, :5].tolist()
    # truncation keeps the end token, no padding left
    assert tokens[2, -1] == 49407 and (tokens[2] != 0).all()
    assert encoder.string_to_token_ids("*") == [STAR]


def test_interface_members():
    with torch.device("meta"):
        encoders = [FrozenOpenCLIPEmbedder(), FrozenOpenCLIPEmbedder2(), FrozenCLIPEmbedderHidden(),
                    FrozenCLIPEmbedder(), BERTEmbedder(n_embed=32, n_layer=1)]
    assert all(isinstance(e, TextEncoder) for e in encoders)
    assert not isinstance(ClassEmbedder(8), TextEncoder) and not isinstance(nn.Linear(2, 2), TextEncoder)
    assert [embedding_key(e) for e in encoders] == [None, "clip_g", "clip_l", None, None]
    for encoder in encoders[:4]:
        assert len(encoder.string_to_token_ids("*")) == len(encoder.string_to_token_ids("sks")) == 1
        assert len(encoder.string_to_token_ids("a photo")) == 2
    assert encoders[4].string_to_token_ids("*") == [1008]  # bert-base-uncased


class ReplaceToken(nn.Module):
    """The manager's contract in miniature: rewrite the embedding at one token id."""

    def __init__(self, token_id, vector):
        super().__init__()
        self.token_id, self.vector = token_id, vector

    def forward(self, tokens, embedded):
        return torch.where((tokens == self.token_id).unsqueeze(-1), self.vector.to(embedded.dtype), embedded)


@torch.no_grad()
@pytest.mark.parametrize("which", ["sd2", "sdxl_g", "sdxl_l"])
def test_embedding_manager_rewrites_only_placeholder_positions(which, sd2_tiny, sdxl_g_tiny, sdxl_l_tiny):
    encoder = {"sd2": sd2_tiny, "sdxl_g": sdxl_g_tiny, "sdxl_l": sdxl_l_tiny}[which]
    vector = torch.randn(encoder.embedding_dim, generator=torch.Generator().manual_seed(3))
    tokens = encoder.tokenize(["a photo of *", "a photo of a dog"])
    plain = encoder.encode_tokens(tokens)
    managed = encoder.encode_tokens(tokens, embedding_manager=ReplaceToken(STAR, vector))
    # The same as if the vocabulary held the vector at "*": the manager acts on token embeddings, before positions.
    original = encoder.token_embedding.weight[STAR].clone()
    encoder.token_embedding.weight[STAR] = vector
    try:
        swapped = encoder.encode_tokens(tokens)
    finally:
        encoder.token_embedding.weight[STAR] = original
    hidden = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    torch.testing.assert_close(hidden(managed), hidden(swapped), rtol=0, atol=1e-6)
    assert not torch.allclose(hidden(managed)[0, 4:], hidden(plain)[0, 4:])  # from the placeholder on
    torch.testing.assert_close(hidden(managed)[0, :4], hidden(plain)[0, :4], rtol=0, atol=1e-6)  # causal
    torch.testing.assert_close(hidden(managed)[1], hidden(plain)[1], rtol=0, atol=1e-6)  # no placeholder
    if isinstance(managed, tuple):
        assert not torch.allclose(managed[1][0], plain[1][0]) and torch.allclose(managed[1][1], plain[1][1])


@torch.no_grad()
def test_embedding_manager_on_openclip_tower(sd2_tiny):
    """The project's EmbeddingManager works through the interface: initialised from "dog", "*" encodes as "dog"."""
    manager = EmbeddingManager(sd2_tiny, placeholder_strings=["*"], initializer_words=["dog"])
    assert manager.token_dim == 16
    star = sd2_tiny.encode_tokens(sd2_tiny.tokenize("a photo of *"), embedding_manager=manager)
    dog = sd2_tiny.encode_tokens(sd2_tiny.tokenize("a photo of dog"))
    torch.testing.assert_close(star, dog, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- bad input: clear one-line errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="ViT-Q-99"), "unknown arch 'ViT-Q-99'"),
    (dict(layer="first"), "layer must be one of last, penultimate"),
    (dict(version="laion5b_typo"), "not an OpenCLIP pretrained tag of ViT-H-14"),
    (dict(config=dict(depth=2)), "unknown config keys ['depth']"),
    (dict(config=dict(width=30, heads=4, layers=1)), "width 30 is not divisible by heads 4"),
])
def test_openclip_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=None) as err:
        FrozenOpenCLIPEmbedder(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sdxl_bad_options():
    with pytest.raises(ValueError, match="needs legacy: False"):
        FrozenOpenCLIPEmbedder2(config=TINY_G, layer="penultimate", always_return_pooled=True)
    with pytest.raises(ValueError, match="layer_idx 4 is outside 0..3"):
        FrozenCLIPEmbedderHidden(config=TINY_CLIP, layer_idx=4)
    with pytest.raises(ValueError, match="layer must be 'hidden'"):
        FrozenCLIPEmbedderHidden(config=TINY_CLIP, layer="last")


# ---------------------------------------------------------------- in LatentDiffusion, as Stability's configs use it

def test_tiny_sd2_style_ldm_trains_only_the_embedding_through_the_openclip_encoder(tiny_finetune_config_path):
    """A tiny LatentDiffusion with the SD 2.x encoder (as `cond_stage_config` names it) takes a textual-inversion
    step: the gradient reaches the placeholder's vector through the OpenCLIP tower and nothing else trains."""
    config = OmegaConf.load(tiny_finetune_config_path)
    config.model.params.cond_stage_config = OmegaConf.create({
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"freeze": True, "layer": "penultimate", "config": {"width": 32, "layers": 2, "heads": 2}}})
    model = build_tiny_model(config)
    assert isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder)
    keys = model.state_dict()
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.text_projection" in keys and "cond_stage_model.model.logit_scale" in keys
    model.train()
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a photo of *", "a rendition of *"]}
    loss, _ = model.shared_step(batch)
    loss.backward()
    vector = model.embedding_manager.string_to_param_dict["*"]
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.cond_stage_model.parameters())
    assert all(p.grad is None for p in model.model.parameters())


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("which", ["sd2", "sdxl_g"])
def test_full_size_towers_match_transformers(which):
    """The real shapes (random weights): ViT-H penultimate vs diffusers' 23-layer SD 2.x encoder, bigG penultimate
    and pooled vs CLIPTextModelWithProjection, through diffusers' converters. ~3 GB (ViT-H) / ~6 GB (bigG)."""
    torch.manual_seed(0)
    if which == "sd2":
        ours, prefix = instantiate_from_config(SD2_COND_STAGE), SD2_PREFIX
        hf = CLIPTextModel(hf_text_config(1024, 23, 16, 1024))
    else:
        ours, prefix = instantiate_from_config(SDXL_EMBEDDER_1), SDXL_G_PREFIX
        hf = CLIPTextModelWithProjection(hf_text_config(1280, 32, 20, 1280))
    load_converted(hf, convert_open_clip_checkpoint(hf, official(ours, prefix), prefix=prefix))
    tokens = ours.tokenize(PROMPTS)
    out = hf(input_ids=tokens, output_hidden_states=True)
    if which == "sd2":
        torch.testing.assert_close(ours.encode_tokens(tokens), out.last_hidden_state, rtol=0, atol=1e-5)
    else:
        hidden, pooled = ours.encode_tokens(tokens)
        torch.testing.assert_close(hidden, out.hidden_states[-2], rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=1e-5)
