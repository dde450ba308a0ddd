"""SDXL's GeneralConditioner and per-encoder textual inversion, against diffusers' own SDXL pipeline.

The reference is a tiny StableDiffusionXLPipeline built locally (random tiny configs, tokenizers from our BPE files,
no hub) whose text encoders hold our conditioner's weights, moved by diffusers' own converters from the official
`conditioner.embedders.N.*` keys; its encode_prompt, _get_add_time_ids, UNet add_time_proj and
load_textual_inversion are the code we compare with.
"""
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.modules.embedding_manager import MultiEmbeddingManager
from ldm.modules.encoders.clip_tokenizer import write_tokenizer_files
from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND, GeneralConditioner

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TINY_G = dict(width=32, layers=3, heads=4, embed_dim=24)
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
# Distinct numbers, so a swapped order of the keys or of (height, width) shows.
SIZES = {"original_size_as_tuple": (896, 1152), "crop_coords_top_left": (64, 32), "target_size_as_tuple": (1024, 768)}
PROMPTS = ["a photo of a dog", "a red square on a black background"]


def emb_models(clip_l=None, clip_g=None, layer_idx=2):
    """Stability's sd_xl_base.yaml conditioner list; `clip_l`/`clip_g`: tiny tower overrides (None: full size)."""
    size_embedder = lambda key: {"is_trainable": False, "input_key": key,  # noqa: E731
                                 "target": "ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND",
                                 "params": {"outdim": 256}}
    return [
        {"is_trainable": False, "input_key": "txt",
         "target": "ldm.modules.encoders.clip_hidden.FrozenCLIPEmbedderHidden",
         "params": {"layer": "hidden", "layer_idx": layer_idx, "config": clip_l}},
        {"is_trainable": False, "input_key": "txt", "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False, "config": clip_g}},
    ] + [size_embedder(key) for key in SIZE_KEYS]


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return module


def batch(prompts, sizes=SIZES):
    return {"txt": list(prompts), **{key: torch.tensor([value] * len(prompts)) for key, value in sizes.items()}}


@pytest.fixture(scope="module")
def conditioner():
    return randomize(GeneralConditioner(emb_models(TINY_CLIP, TINY_G)), 0)


def official_state_dict(conditioner):
    return {"conditioner." + k: v for k, v in conditioner.state_dict().items()}


def tiny_sdxl_pipeline(conditioner, tmp_path):
    """diffusers' SDXL pipeline whose text encoders are our conditioner's, through diffusers' converters."""
    sd = official_state_dict(conditioner)
    text_config = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                       hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_config, "intermediate_size": 64,
                                                   "hidden_act": "quick_gelu"}))
    l_weights = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith("conditioner.embedders.0.")})
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, hidden_act="gelu", projection_dim=24))
    g_weights = convert_open_clip_checkpoint(text_encoder_2, sd, prefix="conditioner.embedders.1.model.")
    for model, weights in ((text_encoder, l_weights), (text_encoder_2, g_weights)):
        if not hasattr(model, "text_model"):  # transformers 5.x: flat modules
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        model.load_state_dict(weights, strict=True)
    files = write_tokenizer_files(tmp_path / "tokenizer")
    vocab, merges = str(files / "vocab.json"), str(files / "merges.txt")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=24 + 6 * 256, cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=CLIPTokenizer(vocab, merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler())


def diffusers_conditioning(pipe, prompts, sizes=SIZES):
    """crossattn and vector as diffusers' SDXL pipeline computes them (encode_prompt, add time ids, add_time_proj)."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(sizes["original_size_as_tuple"], sizes["crop_coords_top_left"],
                                      sizes["target_size_as_tuple"], dtype=torch.float32,
                                      text_encoder_projection_dim=pooled.shape[-1])
    time_embeds = pipe.unet.add_time_proj(time_ids.flatten()).reshape(1, -1).expand(len(prompts), -1)
    return prompt_embeds, torch.cat([pooled, time_embeds], dim=-1)


# ---------------------------------------------------------------- micro-conditioning

def test_size_embedding_is_diffusers_timestep_embedding():
    sizes = torch.tensor([[1024.0, 1024.0], [896.0, 1152.0], [0.0, 64.0]])
    ours = ConcatTimestepEmbedderND(256)(sizes)
    reference = get_timestep_embedding(sizes.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.shape == (3, 512)
    torch.testing.assert_close(ours, reference.reshape(3, 512), rtol=0, atol=1e-6)
    torch.testing.assert_close(ConcatTimestepEmbedderND(256)(sizes[:, 0]), reference[0::2], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the whole conditioning vs diffusers' SDXL pipeline

@torch.no_grad()
def test_crossattn_and_vector_match_diffusers_sdxl_pipeline(conditioner, tmp_path):
    pipe = tiny_sdxl_pipeline(conditioner, tmp_path)
    out = conditioner(batch(PROMPTS))
    crossattn, vector = diffusers_conditioning(pipe, PROMPTS)
    assert set(out) == {"crossattn", "vector"}
    assert out["crossattn"].shape == (2, 77, 64) and out["vector"].shape == (2, 24 + 3 * 512)
    torch.testing.assert_close(out["crossattn"], crossattn, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["vector"], vector, rtol=0, atol=1e-5)


@torch.no_grad()
def test_zeroed_and_dropped_embeddings(conditioner):
    c, uc = conditioner.get_unconditional_conditioning(batch(PROMPTS), force_uc_zero_embeddings=["txt"])
    # SDXL's negative conditioning without a negative prompt: text parts zero, size embeddings kept.
    assert not c["crossattn"].eq(0).all() and uc["crossattn"].eq(0).all()
    assert uc["vector"][:, :24].eq(0).all() and torch.equal(uc["vector"][:, 24:], c["vector"][:, 24:])
    text = conditioner.embedders[0]
    text.ucg_rate = 1.0  # every caption dropped: that encoder's part of crossattn is zero
    try:
        dropped = conditioner(batch(PROMPTS))
    finally:
        text.ucg_rate = 0.0
    assert dropped["crossattn"][..., :32].eq(0).all()
    torch.testing.assert_close(dropped["crossattn"][..., 32:], c["crossattn"][..., 32:], rtol=0, atol=0)


@torch.no_grad()
def test_legacy_ucg_replaces_the_caption(conditioner):
    """legacy_ucg_val: a dropped caption is replaced by that text (here every one, ucg_rate 1), not zeroed."""
    for embedder in conditioner.text_encoders:
        embedder.ucg_rate, embedder.legacy_ucg_val = 1.0, ""
    try:
        dropped = conditioner(batch(PROMPTS))
    finally:
        for embedder in conditioner.text_encoders:
            embedder.ucg_rate, embedder.legacy_ucg_val = 0.0, None
    empty = conditioner(batch(["", ""]))
    torch.testing.assert_close(dropped["crossattn"], empty["crossattn"], rtol=0, atol=0)
    torch.testing.assert_close(dropped["vector"], empty["vector"], rtol=0, atol=0)
    assert not empty["crossattn"].eq(0).all()


def test_frozen_embedders_and_bad_config():
    cond = GeneralConditioner(emb_models(TINY_CLIP, TINY_G))
    cond.train()
    assert not any(p.requires_grad for p in cond.parameters()) and not cond.embedders[1].training
    bad = emb_models(TINY_CLIP, TINY_G)[:1]
    del bad[0]["input_key"]
    with pytest.raises(ValueError, match=r"emb_models\[0\] .*FrozenCLIPEmbedderHidden.* needs input_key"):
        GeneralConditioner(bad)


# ---------------------------------------------------------------- textual inversion through the conditioner

def test_one_vector_set_per_encoder_initialised_from_the_word(conditioner):
    manager = MultiEmbeddingManager(conditioner.text_encoders, placeholder_strings=["*"], initializer_words=["dog"])
    assert list(manager.managers) == ["clip_l", "clip_g"] and manager.widths == (32, 32)
    with torch.no_grad():
        star = conditioner(batch(["a photo of *"]), embedding_manager=manager)
        dog = conditioner(batch(["a photo of dog"]))
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(star[key], dog[key], rtol=0, atol=1e-6)
    # Only the vectors learn, each encoder's from its own output part.
    out = conditioner(batch(["a photo of *"]), embedding_manager=manager)
    (out["crossattn"].square().sum() + out["vector"].square().sum()).backward()
    grads = {key: m.string_to_param_dict["*"].grad for key, m in manager.managers.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(p.grad is not None for p in conditioner.parameters())


@torch.no_grad()
def test_sdxl_file_loads_in_diffusers_and_conditions_as_ours(conditioner, tmp_path):
    """Our clip_l/clip_g file through diffusers' documented SDXL recipe: the same token rows, the same conditioning."""
    manager = MultiEmbeddingManager(conditioner.text_encoders, placeholder_strings=["*"], initializer_words=["dog"],
                                    num_vectors_per_token=2)
    gen = torch.Generator().manual_seed(5)
    for m in manager.managers.values():
        m.string_to_param_dict["*"].copy_(torch.randn(2, m.token_dim, generator=gen) * 0.2)
    path = manager.save(tmp_path / "tri.safetensors", step=10, fmt="a1111-safetensors")

    pipe = tiny_sdxl_pipeline(conditioner, tmp_path)
    state_dict = safetensors.torch.load_file(path)
    pipe.load_textual_inversion(state_dict["clip_l"], token="<tri>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state_dict["clip_g"], token="<tri>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for key, text_encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                         ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tokenizer.convert_tokens_to_ids(["<tri>", "<tri>_1"])
        ours = manager.managers[key].string_to_param_dict["*"]
        assert torch.equal(text_encoder.get_input_embeddings().weight[ids], ours)

    loaded = MultiEmbeddingManager(conditioner.text_encoders)
    assert loaded.load(path, placeholder_strings=["*"]) == [("*", path, 2)]
    ours = conditioner(batch(["a photo of * on a hill"]), embedding_manager=loaded)
    crossattn, vector = diffusers_conditioning(pipe, ["a photo of <tri> on a hill"])
    torch.testing.assert_close(ours["crossattn"], crossattn, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["vector"], vector, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- full size: official key layout (meta device)

def test_full_size_sdxl_conditioner_key_layout_on_meta_device():
    with torch.device("meta"):
        cond = GeneralConditioner(emb_models(layer_idx=11))
    keys = official_state_dict(cond)
    assert all(k.startswith(("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."))
               for k in keys)
    for key, shape in {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.ln_final.bias": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    }.items():
        assert tuple(keys[key].shape) == shape, key
    counts = [sum(p.numel() for p in e.parameters()) for e in cond.embedders]
    assert counts == [123_060_480, 694_659_840 + 1, 0, 0, 0]  # + OpenCLIP's logit_scale
    assert [e.embedding_dim for e in cond.text_encoders] == [768, 1280]
    manager = MultiEmbeddingManager(cond.text_encoders)
    assert manager.widths == (768, 1280)
