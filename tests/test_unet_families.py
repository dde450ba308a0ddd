"""The UNet options of SD 2.x and SDXL: Stability's config keys build the official networks, and tiny versions
compute what diffusers' own UNet computes on the same weights (converted by diffusers' own converter)."""
import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND
from tests.test_unet import randomise, tiny_inputs

# unet_config params of Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml (use_fp16 aside)
SD2_UNET = dict(use_checkpoint=True, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
                use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1, context_dim=1024,
                legacy=False)
# network_config params of Stability-AI/generative-models configs/inference/sd_xl_base.yaml (+ image_size, ours)
SDXL_UNET = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4,
                 out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
                 spatial_transformer_attn_type="softmax-xformers", legacy=False, image_size=128)


def meta_unet(params):
    with torch.device("meta"):
        return UNetModel(**params)


def test_sd2_unet_parameter_count_and_official_keys():
    shapes = {k: v.shape for k, v in meta_unet(SD2_UNET).state_dict().items()}
    assert sum(s.numel() for s in shapes.values()) == 865_910_724
    assert len(shapes) == 686
    # linear projections: 2-D weights, as in the SD 2.x checkpoints
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert shapes["middle_block.1.proj_out.weight"] == (1280, 1280)
    assert shapes["output_blocks.11.1.proj_out.weight"] == (320, 320)
    # 64-wide heads and 1024-wide text
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes["middle_block.1.transformer_blocks.0.attn2.to_v.weight"] == (1280, 1024)
    assert not any(k.startswith("label_emb") for k in shapes)


def test_sdxl_unet_parameter_count_and_official_keys():
    unet = meta_unet(SDXL_UNET)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    assert sum(s.numel() for s in shapes.values()) == 2_567_463_684
    assert shapes["label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["label_emb.0.2.weight"] == (1280, 1280)
    # no attention at the first level (attention_resolutions [4, 2]); depths 2 and 10 at the others, 10 in the middle
    assert not any(k.startswith(("input_blocks.1.1", "input_blocks.2.1", "output_blocks.8.1")) for k in shapes)
    assert shapes["input_blocks.4.1.proj_in.weight"] == (640, 640)
    assert "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in shapes
    assert "input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight" not in shapes
    assert "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight" in shapes
    assert "middle_block.1.transformer_blocks.9.norm3.weight" in shapes
    assert "output_blocks.0.1.transformer_blocks.9.attn2.to_k.weight" in shapes
    assert "output_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in shapes
    assert shapes["output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 2048)


TINY_SD2 = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                use_linear_in_transformer=True, transformer_depth=1, context_dim=16, legacy=False)
# SDXL's shape in small: no attention at level 0, per-level depth, a pooled text vector + 6 micro-conditioning numbers
POOLED, TIME_DIM = 8, 4
TINY_SDXL = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 4],
                 num_res_blocks=1, channel_mult=[1, 2, 2], num_head_channels=8, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 3], context_dim=[16, 16, 16],
                 num_classes="sequential", adm_in_channels=POOLED + 6 * TIME_DIM, legacy=False)


def diffusers_twin(unet, params, **config_overrides):
    """diffusers' UNet2DConditionModel with `unet`'s weights, converted by diffusers' own converter."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = single_file.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=8 * 8)
    config.update(config_overrides)
    twin = UNet2DConditionModel(**config)
    twin.load_state_dict(single_file.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return twin.eval()


def test_tiny_sd2_unet_matches_diffusers_own_unet():
    unet = randomise(UNetModel(**TINY_SD2), seed=5).eval()
    assert unet.state_dict()["input_blocks.1.1.proj_in.weight"].ndim == 2
    twin = diffusers_twin(unet, TINY_SD2)
    assert twin.config.use_linear_projection
    x, t, context = tiny_inputs()
    assert_same_outputs_and_context_grads(lambda c: unet(x, t, context=c),
                                          lambda c: twin(x, t, encoder_hidden_states=c).sample, context)


def assert_same_outputs_and_context_grads(ours, theirs, context):
    """Forward, and the gradient with respect to the text that textual inversion follows."""
    results = []
    for fn in (ours, theirs):
        c = context.clone().requires_grad_(True)
        out = fn(c)
        out.square().mean().backward()
        results.append((out.detach(), c.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_tiny_sdxl_unet_matches_diffusers_own_unet_with_text_time_embedding():
    unet = randomise(UNetModel(**TINY_SDXL), seed=6).eval()
    params = dict(TINY_SDXL, context_dim=16)
    # diffusers picks "text_time" only for SDXL's real widths; at tiny width it is set as its SDXL config has it
    twin = diffusers_twin(unet, params, class_embed_type=None, addition_embed_type="text_time",
                          addition_time_embed_dim=TIME_DIM)
    assert twin.config.transformer_layers_per_block == [1, 2, 3]
    assert twin.config.down_block_types[0] == "DownBlock2D"
    x, t, context = tiny_inputs()
    gen = torch.Generator().manual_seed(7)
    pooled = torch.randn(2, POOLED, generator=gen)
    time_ids = torch.tensor([[64., 64., 0., 0., 64., 64.], [48., 32., 8., 4., 64., 64.]])
    # our y as SDXL's conditioner builds it: pooled text, then each size/crop number's sinusoid
    y = torch.cat([pooled, ConcatTimestepEmbedderND(TIME_DIM)(time_ids)], dim=1)
    assert_same_outputs_and_context_grads(
        lambda c: unet(x, t, context=c, y=y),
        lambda c: twin(x, t, encoder_hidden_states=c,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample, context)
    with torch.no_grad():  # y really conditions the output
        assert not torch.allclose(unet(x, t, context=context, y=y), unet(x, t, context=context, y=y.flip(0)),
                                  atol=1e-3)


def test_disable_self_attentions_attend_to_the_context():
    middle = UNetModel(**dict(TINY_SD2, disable_middle_self_attn=True)).state_dict()
    assert middle["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 16)
    assert middle["input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"].shape == (32, 32)
    # per level (diffusers' only_cross_attention; it has no such option for the middle block)
    params = dict(TINY_SD2, disable_self_attentions=[True, False])
    unet = randomise(UNetModel(**params), seed=8).eval()
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"] == (32, 16)
    assert shapes["input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"] == (64, 64)
    assert shapes["output_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"] == (32, 16)
    twin = diffusers_twin(unet, params)
    x, t, context = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=context), twin(x, t, encoder_hidden_states=context).sample,
                                   atol=1e-5, rtol=1e-5)


def test_bad_family_options_are_refused_with_a_message():
    with pytest.raises(ValueError, match="one entry per level"):
        UNetModel(**dict(TINY_SDXL, transformer_depth=[1, 2]))
    with pytest.raises(ValueError, match="different widths"):
        UNetModel(**dict(TINY_SDXL, context_dim=[16, 8, 16]))
    with pytest.raises(ValueError, match="adm_in_channels"):
        UNetModel(**dict(TINY_SDXL, adm_in_channels=None))
    with pytest.raises(ValueError, match="sequential"):
        UNetModel(**dict(TINY_SDXL, num_classes="continuous"))
    with pytest.raises(ValueError, match="spatial_transformer_attn_type"):
        UNetModel(**dict(TINY_SD2, spatial_transformer_attn_type="vanilla"))
    unet = UNetModel(**TINY_SDXL)
    x, t, context = tiny_inputs()
    with pytest.raises(ValueError, match=r"y must have shape \(2, 32\)"):
        unet(x, t, context=context, y=torch.zeros(2, 31))
