"""The speed switches the README documents.

- torch.compile of the frozen UNet, opt-in: `--compile` in the txt2img scripts, `model.params.compile_unet` in a
  config (or `model.params.compile_unet=true` on main.py's command line). Compiling is lazy: the switches are
  checked without compiling; the compiled outputs (minutes of compiling on a loaded 2-core CPU) in the slow test.
- gradient checkpointing: on in the SD configs (as in the original), off with
  `model.params.unet_config.params.use_checkpoint=false` on main.py's command line.
"""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, build_tiny_model


def is_compiled(module):
    return getattr(module, "_compiled_call_impl", None) is not None


def test_txt2img_compile_flag_compiles_the_unet_only_when_asked(tmp_path, tiny_config, tiny_ckpt):
    from ldm.txt2img_common import build_parser, load_model
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config, config)
    args = ["--config", str(config), "--ckpt", str(tiny_ckpt), "--device", "cpu"]
    assert not is_compiled(load_model(build_parser("t").parse_args(args)).model.diffusion_model)
    model = load_model(build_parser("t").parse_args(args + ["--compile"]))
    assert is_compiled(model.model.diffusion_model)
    assert all(not k.startswith("_orig_mod") and "._orig_mod." not in k for k in model.state_dict())


def test_training_config_switch_compiles_the_unet():
    import main
    opt, unknown = main.get_parser().parse_known_args(
        ["model.params.compile_unet=true", "--base", str(ROOT / "configs/tiny/finetune-tiny.yaml")])
    config, _, _ = main.load_config(opt, unknown)
    model = main.build_model(config)
    assert is_compiled(model.model.diffusion_model)
    assert not is_compiled(build_tiny_model(OmegaConf.load(ROOT / "configs/tiny/finetune-tiny.yaml")).model.diffusion_model)


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_outputs():
    model = build_tiny_model(OmegaConf.load(ROOT / "configs/tiny/txt2img-tiny.yaml"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.get_learned_conditioning(["a photo of *", ""])
    with torch.no_grad():
        eager = [model.apply_model(x, torch.tensor([t, t]), cond) for t in (999, 10)]
        model.compile_unet()
        compiled = [model.apply_model(x, torch.tensor([t, t]), cond) for t in (999, 10)]
    for e, c in zip(eager, compiled):
        assert e.abs().max() > 0
        assert torch.allclose(e, c, atol=1e-4, rtol=1e-4), (e - c).abs().max()


def checkpointing_flags(unet):
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock
    return {m.use_checkpoint if isinstance(m, ResBlock) else m.checkpoint
            for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))}


@pytest.mark.parametrize("config", ["stable-diffusion/v1-finetune.yaml", "stable-diffusion/v2-finetune-v.yaml",
                                    "stable-diffusion-xl/sd_xl_base-finetune.yaml"])
def test_gradient_checkpointing_is_on_in_the_sd_configs_and_the_dotlist_turns_it_off(config):
    import main
    base = ["--base", str(ROOT / "configs" / config)]
    on, _, _ = main.load_config(*main.get_parser().parse_known_args(base))
    off, _, _ = main.load_config(*main.get_parser().parse_known_args(
        ["model.params.unet_config.params.use_checkpoint=false"] + base))
    assert on.model.params.unet_config.params.use_checkpoint is True
    assert off.model.params.unet_config.params.use_checkpoint is False


def test_the_checkpointing_override_reaches_every_block():
    import main
    from ldm.util import instantiate_from_config
    base = ["--base", str(ROOT / "configs/tiny/finetune-tiny.yaml")]
    for value in (True, False):
        config, _, _ = main.load_config(*main.get_parser().parse_known_args(
            [f"model.params.unet_config.params.use_checkpoint={str(value).lower()}"] + base))
        unet = instantiate_from_config(config.model.params.unet_config)
        assert checkpointing_flags(unet) == {value}
