import math

import pytest
import torch

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, LinearAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock, UNetModel

SD_V1_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)


def tiny_unet(**overrides):
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                  context_dim=16, legacy=False)
    params.update(overrides)
    return UNetModel(**params)


def randomise(model, seed=0):
    """Replace the zero-initialised output convs too, so every path carries gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def tiny_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([3, 700])
    context = torch.randn(2, 77, 16, generator=gen)
    return x, t, context


def test_sd_v1_unet_parameter_count_and_official_keys():
    with torch.device("meta"):
        unet = UNetModel(**SD_V1_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    keys = unet.state_dict().keys()
    assert len(keys) == 686
    for key in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.norm.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
                "input_blocks.1.1.transformer_blocks.0.norm3.weight",
                "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "middle_block.0.in_layers.2.weight", "middle_block.1.proj_in.weight", "middle_block.1.proj_out.bias",
                "middle_block.2.out_layers.0.bias", "output_blocks.2.1.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "out.0.weight", "out.2.weight"]:
        assert key in keys, key
    assert unet.state_dict()["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert unet.state_dict()["middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert unet.state_dict()["output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)


def test_tiny_unet_forward_on_cpu():
    torch.manual_seed(0)
    unet = randomise(tiny_unet())
    x, t, context = tiny_inputs()
    out = unet(x, t, context=context)
    assert out.shape == (2, 4, 8, 8)
    assert torch.isfinite(out).all()
    # The text really conditions the output.
    assert not torch.allclose(out, unet(x, t, context=context.flip(0)))


def test_fresh_unet_outputs_zero_as_in_the_original():
    """The final conv is zero-initialised, so an untrained UNet predicts zero."""
    unet = tiny_unet()
    x, t, context = tiny_inputs()
    assert torch.equal(unet(x, t, context=context), torch.zeros(2, 4, 8, 8))


def _count_block_forwards(unet):
    """Count forward calls of the first layer inside each checkpointed block (a recomputation re-runs them)."""
    counts = {"res": 0, "transformer": 0}

    def counter(kind):
        def hook(*_):
            counts[kind] += 1
        return hook

    for module in unet.modules():
        if isinstance(module, ResBlock):
            module.in_layers.register_forward_hook(counter("res"))
        elif isinstance(module, BasicTransformerBlock):
            module.attn1.register_forward_hook(counter("transformer"))
    return counts


def _grads(use_checkpoint, train_params):
    unet = randomise(tiny_unet(use_checkpoint=use_checkpoint))
    unet.requires_grad_(train_params)
    counts = _count_block_forwards(unet)
    x, t, context = tiny_inputs()
    context.requires_grad_(True)
    unet(x, t, context=context).square().mean().backward()
    param_grads = {name: p.grad for name, p in unet.named_parameters() if p.grad is not None}
    n_res = sum(isinstance(m, ResBlock) for m in unet.modules())
    n_transformer = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    return context.grad, param_grads, counts, n_res, n_transformer


@pytest.mark.parametrize("train_params", [True, False], ids=["params-trained", "frozen-unet"])
def test_gradient_checkpointing_recomputes_and_matches(train_params):
    """`use_checkpoint: True` must really recompute blocks in backward and give the same gradients.

    The original disabled checkpointing with a hard-coded `if False:` in diffusionmodules/util.py, so the
    flag did nothing; this fork fixes that. Textual inversion trains only through the context with the UNet
    frozen, so the context gradient must survive checkpointing even when no UNet parameter requires grad.
    """
    ctx_plain, params_plain, counts_plain, n_res, n_transformer = _grads(False, train_params)
    ctx_ckpt, params_ckpt, counts_ckpt, _, _ = _grads(True, train_params)

    assert counts_plain == {"res": n_res, "transformer": n_transformer}
    # Frozen, the first ResBlock sees neither context nor a trainable weight: backward never reaches it.
    n_res_in_backward = n_res if train_params else n_res - 1
    assert counts_ckpt == {"res": n_res + n_res_in_backward, "transformer": 2 * n_transformer}

    assert ctx_plain.abs().sum() > 0
    torch.testing.assert_close(ctx_ckpt, ctx_plain, atol=1e-6, rtol=0)
    if train_params:
        assert len(params_plain) == len(list(tiny_unet().parameters()))
        assert params_ckpt.keys() == params_plain.keys()
        for name in params_plain:
            torch.testing.assert_close(params_ckpt[name], params_plain[name], atol=1e-6, rtol=0, msg=name)
    else:
        assert params_plain == {} and params_ckpt == {}


def test_no_recomputation_without_grad():
    unet = randomise(tiny_unet(use_checkpoint=True))
    counts = _count_block_forwards(unet)
    x, t, context = tiny_inputs()
    with torch.no_grad():
        unet(x, t, context=context)
    n_res = sum(isinstance(m, ResBlock) for m in unet.modules())
    n_transformer = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    assert counts == {"res": n_res, "transformer": n_transformer} == {"res": 8, "transformer": 7}


def _reference_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def test_cross_attention_matches_softmax_reference():
    torch.manual_seed(0)
    heads, dim_head = 3, 8
    attn = CrossAttention(query_dim=12, context_dim=20, heads=heads, dim_head=dim_head)
    x, context = torch.randn(2, 10, 12), torch.randn(2, 7, 20)

    def split(t):
        return t.reshape(2, -1, heads, dim_head).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
    expected = attn.to_out(_reference_attention(q, k, v).transpose(1, 2).reshape(2, 10, heads * dim_head))
    torch.testing.assert_close(attn(x, context), expected, atol=1e-5, rtol=1e-5)

    # A mask hides context tokens: masking the last 3 equals dropping them.
    mask = torch.tensor([True] * 4 + [False] * 3).expand(2, 7)
    torch.testing.assert_close(attn(x, context, mask=mask), attn(x, context[:, :4]), atol=1e-5, rtol=1e-5)


def test_self_attention_without_context_attends_to_itself():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(attn(x), attn(x, context=x))


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy-qkv", "new-qkv"])
def test_attention_block_matches_softmax_reference(new_order):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=2, use_new_attention_order=new_order)
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, 64, 4, 4)
    qkv = block.qkv(block.norm(x.reshape(2, 64, 16)))
    if new_order:
        q, k, v = (t.reshape(2, 2, 32, 16) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(2, 2, 96, 16).split(32, dim=2)
    h = _reference_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    expected = x.reshape(2, 64, 16) + block.proj_out(h.transpose(-1, -2).reshape(2, 64, 16))
    torch.testing.assert_close(block(x), expected.reshape(2, 64, 4, 4), atol=1e-5, rtol=1e-5)


def test_spatial_transformer_starts_as_identity():
    block = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=16)
    x = torch.randn(1, 32, 3, 5)
    assert torch.equal(block(x, torch.randn(1, 4, 16)), x)


def test_linear_attention_shape():
    attn = LinearAttention(8, heads=2, dim_head=4)
    assert attn(torch.randn(2, 8, 3, 5)).shape == (2, 8, 3, 5)


def test_class_conditional_unet_without_text_with_resampling_resblocks():
    unet = randomise(UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                               attention_resolutions=[2], channel_mult=[1, 2], num_classes=5, num_head_channels=16,
                               use_scale_shift_norm=True, resblock_updown=True))
    assert isinstance(unet.middle_block[1], AttentionBlock) and unet.middle_block[1].num_heads == 4
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    y = torch.tensor([0, 4])
    out = unet(x, t, y=y)
    assert out.shape == (2, 3, 8, 8)
    assert not torch.allclose(out, unet(x, t, y=y.flip(0)))
    with pytest.raises(ValueError, match="class-conditional"):
        unet(x, t)


def test_fp16_torso_runs_and_returns_input_dtype():
    unet = randomise(tiny_unet(use_fp16=True))
    assert unet.input_blocks[0][0].weight.dtype == torch.float16
    assert unet.middle_block[1].norm.weight.dtype == torch.float32
    assert unet.out[2].weight.dtype == torch.float32
    x, t, context = tiny_inputs()
    out = unet(x, t, context=context)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    unet.convert_to_fp32()
    torch.testing.assert_close(unet(x, t, context=context), out, atol=0.05, rtol=0.05)


def test_bad_configurations_and_context_lists_are_rejected():
    with pytest.raises(ValueError, match="context_dim"):
        tiny_unet(context_dim=None)
    with pytest.raises(ValueError, match="different widths"):
        tiny_unet(context_dim=[16, 8])
    x, t, context = tiny_inputs()
    with pytest.raises(TypeError, match="one tensor"):
        tiny_unet()(x, t, context=[context])


def diffusers_twin(unet, params):
    """diffusers' own UNet2DConditionModel holding `unet`'s weights, converted by diffusers' own converter."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = single_file.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=8 * 8)
    twin = UNet2DConditionModel(**config)
    twin.load_state_dict(single_file.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return twin.eval()


def test_unet_matches_diffusers_own_unet_on_the_same_weights():
    """Forward and the input-gradient backward TI needs, against the independent implementation."""
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=16, legacy=False)
    unet = randomise(UNetModel(**params), seed=3).eval()
    twin = diffusers_twin(unet, params)
    x, t, context = tiny_inputs()
    grads = []
    outs = []
    for fn in (lambda c: unet(x, t, context=c), lambda c: twin(x, t, encoder_hidden_states=c).sample):
        c = context.clone().requires_grad_(True)
        out = fn(c)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(c.grad)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _conv_input_formats(unet, x, t, context):
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.add(
        "nchw" if inp[0].is_contiguous() else
        "channels_last" if inp[0].is_contiguous(memory_format=torch.channels_last) else "other"))
        for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    out = unet(x, t, context=context)
    for h in hooks:
        h.remove()
    return seen, out


def test_every_convolution_sees_the_layout_of_its_weights():
    """A channels-last tensor leaking out of the spatial transformer made each later conv re-lay-out its weight
    on every call (a quarter of the SD UNet's time). NCHW stays NCHW; a channels-last model stays channels-last."""
    unet = randomise(tiny_unet(image_size=16))
    x, t, context = tiny_inputs()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        formats, out = _conv_input_formats(unet, x, t, context)
        assert formats == {"nchw"}
        unet.to(memory_format=torch.channels_last)
        formats, out_cl = _conv_input_formats(unet, x.to(memory_format=torch.channels_last), t, context)
    assert formats == {"channels_last"}
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-5)


def test_coordinate_features_locate_each_position():
    from ldm.modules.diffusionmodules.openaimodel import coordinate_features
    features = coordinate_features(torch.zeros(1, 3, 4, 6))
    assert features.shape == (1, 8, 4, 6)
    rows, cols = features[0, 0], features[0, 4]  # each axis's coordinate in [-1, 1], at pixel centres
    torch.testing.assert_close(rows[:, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(cols[0], torch.linspace(-5 / 6, 5 / 6, 6))
    assert len({tuple(features[0, :, i, j].tolist()) for i in range(4) for j in range(6)}) == 24  # all distinct


def test_position_input_adds_keys_and_tells_places_apart():
    """position_input (not in the original) gives the UNet its pixels' coordinates: one extra 1x1 conv, every other
    key as before; features of a constant input then differ from place to place, and so does the output."""
    from ldm.modules.diffusionmodules.openaimodel import coordinate_features
    plain, placed = tiny_unet(), tiny_unet(position_input=True)
    extra = set(placed.state_dict()) - set(plain.state_dict())
    assert extra == {"position_embed.weight", "position_embed.bias"}
    assert set(plain.state_dict()) <= set(placed.state_dict())
    assert placed.state_dict()["position_embed.weight"].abs().sum() > 0  # not zero-initialised
    randomise(placed)
    x, t, context = tiny_inputs()
    constant = torch.ones_like(x)
    with torch.no_grad():
        block0 = placed.input_blocks[0](constant, None, None)
        torch.testing.assert_close(block0[..., 3, 3], block0[..., 4, 4])  # a 3x3 conv of a constant: no place
        added = placed.position_embed(coordinate_features(block0))
        assert not torch.allclose(added[..., 3, 3], added[..., 4, 4])
        with_position = placed(constant, t, context=context)
        placed.position_embed.weight.zero_()
        placed.position_embed.bias.zero_()
        assert not torch.allclose(with_position, placed(constant, t, context=context))
