"""Extended textual inversion (XTI / P+, ldm.modules.xti) on the tiny model: layers, equivalence to the ordinary
path when every layer holds the same vectors, guided sampling, file formats, main.py training and sampling."""
import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import build_tiny_model, load_script
from ldm.checkpoint import load_checkpoint
from ldm.models.diffusion.generate import generate
from ldm.modules.embedding_io import load_embedding_file, read_xti_file, save_xti_file
from ldm.modules.xti import XTIEmbeddingManager

ROOT = Path(__file__).resolve().parents[1]
TINY_LAYERS = ("IN01", "IN03", "MID", "OUT00", "OUT01", "OUT02", "OUT03")
KOHYA_SD_V1_LAYERS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06",
                      "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")


@pytest.fixture
def model(tiny_config):
    return build_tiny_model(tiny_config)


def xti_manager(model, **kwargs):
    args = dict(placeholder_strings=["*"], initializer_words=["triangle"], num_vectors_per_token=2)
    return XTIEmbeddingManager(model.cond_stage_model, unet=model.model.diffusion_model, **{**args, **kwargs})


def with_xti(model):
    """`model` with an XTI manager whose every layer holds the ordinary manager's vectors."""
    ordinary = model.embedding_manager
    manager = xti_manager(model, num_vectors_per_token=ordinary.max_vectors_per_token)
    with torch.no_grad():
        manager.string_to_param_dict["*"].copy_(ordinary.string_to_param_dict["*"].expand(len(TINY_LAYERS), -1, -1))
    model.embedding_manager = manager
    return model


# ------------------------------------------------------------------------------------------------ layers
def test_layers_are_the_unets_cross_attentions_in_order(model):
    unet = model.model.diffusion_model
    assert unet.cross_attention_layer_names == TINY_LAYERS
    from ldm.modules.attention import SpatialTransformer
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert [t.layer_index for t in transformers] == list(range(len(TINY_LAYERS)))


def test_sd_v1_layout_gives_kohyas_sixteen_layer_names():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=16, use_checkpoint=False, legacy=False)
    assert unet.cross_attention_layer_names == KOHYA_SD_V1_LAYERS


# ------------------------------------------------------------------------------------------------ protocol
class PerLayerOnly(torch.nn.Module):
    """Says whether it is per layer, and nothing else an embedding manager has."""
    per_layer = False

    def __init__(self, embedder, **kwargs):
        super().__init__()


def test_every_manager_kind_is_an_embedding_manager_protocol_and_a_non_manager_is_refused(model, tiny_config):
    from ldm.modules.embedding_manager import EmbeddingManager, MultiEmbeddingManager
    from ldm.modules.encoders.base import EmbeddingManagerProtocol
    ordinary, per_layer = model.embedding_manager, xti_manager(model)
    assert type(ordinary) is EmbeddingManager and isinstance(ordinary, EmbeddingManagerProtocol)
    assert isinstance(per_layer, EmbeddingManagerProtocol)
    assert (ordinary.per_layer, per_layer.per_layer, MultiEmbeddingManager.per_layer) == (False, True, False)
    encoder = model.cond_stage_model
    assert ordinary.manager_for(encoder) is ordinary and per_layer.manager_for(encoder) is per_layer
    assert ordinary.concepts == per_layer.concepts == ["*"]
    assert (ordinary.interchange_format(), per_layer.interchange_format()) == ("a1111-safetensors", None)
    assert not isinstance(torch.nn.Linear(2, 2), EmbeddingManagerProtocol)
    config = OmegaConf.create(OmegaConf.to_container(tiny_config))
    config.model.params.personalization_config.target = "torch.nn.Identity"
    with pytest.raises(TypeError, match="torch.nn.Identity is not an embedding manager"):
        build_tiny_model(config)
    config.model.params.personalization_config.target = f"{__name__}.PerLayerOnly"
    with pytest.raises(TypeError, match="PerLayerOnly is not an embedding manager: it lacks members"):
        build_tiny_model(config)



def test_one_set_for_all_layers_is_the_ordinary_path(model):
    prompts = ["a photo of *", "a photo of a dog"]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    ordinary_c = model.get_learned_conditioning(prompts)
    ordinary_out = model.apply_model(x, t, ordinary_c)
    noise = torch.randn_like(x)
    ordinary_loss, _ = model.p_losses(x, t, ordinary_c, noise=noise)

    with_xti(model)
    c = model.get_learned_conditioning(prompts)
    assert c.shape == (2, len(TINY_LAYERS), *ordinary_c.shape[1:])
    for layer in range(len(TINY_LAYERS)):
        assert torch.allclose(c[:, layer], ordinary_c, atol=1e-6)
    assert torch.allclose(model.apply_model(x, t, c), ordinary_out, atol=1e-6)
    loss, _ = model.p_losses(x, t, c, noise=noise)
    assert abs(loss.item() - ordinary_loss.item()) < 1e-6

    # and each layer really reads its own context: changing one layer's vectors changes the output
    with torch.no_grad():
        model.embedding_manager.string_to_param_dict["*"][4].add_(1.0)
    changed = model.get_learned_conditioning(prompts)
    assert torch.equal(changed[:, 3], c[:, 3]) and not torch.allclose(changed[0, 4], c[0, 4])
    assert torch.equal(changed[1], c[1])  # the prompt without the placeholder is untouched
    assert not torch.equal(model.apply_model(x, t, changed), model.apply_model(x, t, c))


def test_each_cross_attention_reads_its_own_layers_context(model):
    from ldm.modules.attention import SpatialTransformer
    seen = {}
    transformers = [m for m in model.model.diffusion_model.modules() if isinstance(m, SpatialTransformer)]
    for transformer in transformers:
        transformer.transformer_blocks[0].attn2.register_forward_pre_hook(
            lambda module, args, kwargs, index=transformer.layer_index: seen.__setitem__(index, kwargs["context"]),
            with_kwargs=True)
    c = torch.randn(2, len(TINY_LAYERS), 77, 32)
    model.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), c)
    assert sorted(seen) == list(range(len(TINY_LAYERS)))
    assert all(torch.equal(seen[i], c[:, i]) for i in seen)


def test_each_layer_gets_its_own_gradient(model):
    with_xti(model)
    param = model.embedding_manager.string_to_param_dict["*"]
    x = torch.randn(2, 4, 8, 8)
    loss = model.apply_model(x, torch.tensor([500, 900]), model.get_learned_conditioning(2 * ["a photo of *"]))
    loss.pow(2).mean().backward()
    per_layer = param.grad.flatten(1).norm(dim=1)
    assert (per_layer > 0).all() and len(set(per_layer.tolist())) == len(TINY_LAYERS)


def test_unconditional_context_stays_plain(model):
    with_xti(model)
    assert model.get_learned_conditioning(["", ""]).ndim == 3


@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler_a"])
def test_guided_sampling_with_one_set_equals_the_ordinary(model, sampler):
    prompts = ["a photo of *"]
    kwargs = dict(sampler=sampler, steps=3, scale=5.0)
    ordinary = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    with_xti(model)
    xti = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.allclose(xti, ordinary, atol=1e-5)


def test_contexts_of_another_layer_count_are_refused(model):
    c = torch.randn(1, 5, 77, 32)
    with pytest.raises(ValueError, match="5 per-layer contexts but this UNet has 7 cross-attention layers"):
        model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1]), c)


def test_xti_regulariser_is_the_ordinary_one_per_layer(model):
    ordinary = model.embedding_manager
    with torch.no_grad():
        ordinary.string_to_param_dict["*"].add_(0.5)
    expected = ordinary.embedding_to_coarse_loss()
    with_xti(model)
    assert torch.allclose(model.embedding_manager.embedding_to_coarse_loss(), expected)


# ------------------------------------------------------------------------------------------------ files
def trained_like(model):
    manager = xti_manager(model)
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(torch.randn_like(manager.string_to_param_dict["*"]))
    return manager


def test_official_xti_round_trip(model, tmp_path):
    manager = trained_like(model)
    path = manager.save(str(tmp_path / "embeddings.pt"), step=7)
    raw = torch.load(path, weights_only=True)
    assert raw["xti_layers"] == list(TINY_LAYERS) and raw["string_to_param"]["*"].shape == (7, 2, 32)
    assert int(raw["string_to_token"]["*"]) == int(manager.string_to_token_dict["*"]) and raw["step"] == 7
    other = xti_manager(model, initializer_words=["circle"])
    assert other.load(path) == [("*", path, 2)]
    assert torch.equal(other.string_to_param_dict["*"], manager.string_to_param_dict["*"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_kohya_xti_round_trip(model, tmp_path, suffix):
    manager = trained_like(model)
    vectors = manager.string_to_param_dict["*"].detach()
    path = str(tmp_path / f"mything{suffix}")
    manager.save(path, fmt="kohya-xti")
    raw = load_checkpoint(path)
    assert set(raw) == set(TINY_LAYERS)
    assert all(torch.equal(raw[name], vectors[i]) for i, name in enumerate(TINY_LAYERS))
    back = read_xti_file(path)
    assert back.format == "kohya-xti" and back.layers == TINY_LAYERS and torch.equal(back.vectors["mything"], vectors)
    other = xti_manager(model)
    other.load(path, placeholder_strings=["*"])
    assert torch.equal(other.string_to_param_dict["*"], vectors)


def test_convert_between_official_and_kohya_xti(model, tmp_path):
    convert = load_script("convert_embedding")
    manager = trained_like(model)
    official = manager.save(str(tmp_path / "embeddings.pt"))
    kohya = tmp_path / "concept.safetensors"
    assert convert.main(["--input", official, "--output", str(kohya), "--to", "kohya-xti"]) == 0
    back = tmp_path / "back.pt"
    assert convert.main(["--input", str(kohya), "--output", str(back), "--to", "official", "--name", "*"]) == 0
    xti = read_xti_file(back)
    assert xti.layers == TINY_LAYERS and torch.equal(xti.vectors["*"], manager.string_to_param_dict["*"].detach())
    assert xti.tokens["*"] == int(manager.string_to_token_dict["*"])


def test_ordinary_readers_refuse_an_xti_file(model, tmp_path, capsys):
    path = trained_like(model).save(str(tmp_path / "xti.pt"))
    with pytest.raises(ValueError, match=r"xti\.pt is an extended textual inversion \(XTI / P\+\) embedding"):
        load_embedding_file(path)
    with pytest.raises(ValueError, match="7 cross-attention layers"):
        model.embedding_manager.load(path)  # the ordinary manager
    convert = load_script("convert_embedding")
    assert convert.main(["--input", path, "--output", str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 1
    assert "xti.pt is an extended textual inversion" in capsys.readouterr().err
    ordinary = model.embedding_manager.save(str(tmp_path / "ordinary.pt"))
    assert convert.main(["--input", ordinary, "--output", str(tmp_path / "k.pt"), "--to", "kohya-xti"]) == 1
    assert "holds one vector set for all layers" in capsys.readouterr().err
    import merge_embeddings
    merged = tmp_path / "merged.pt"
    assert merge_embeddings.main(["--manager_ckpts", ordinary, path, "--output_path", str(merged),
                                  "--on_clash", "skip"]) == 1
    assert "xti.pt is an extended textual inversion" in capsys.readouterr().err and not merged.exists()


def test_xti_file_for_another_unet_is_refused(model, tmp_path):
    path = str(tmp_path / "sd.safetensors")
    save_xti_file(path, {"x": torch.randn(16, 1, 32)}, KOHYA_SD_V1_LAYERS, fmt="kohya-xti")
    with pytest.raises(ValueError, match=r"16 cross-attention layers .*this model's UNet has 7"):
        xti_manager(model).load(path)


def test_an_ordinary_file_fills_every_layer(model, tmp_path):
    ordinary = model.embedding_manager
    path = ordinary.save(str(tmp_path / "ordinary.pt"))
    manager = xti_manager(model, initializer_words=["circle"])
    manager.load(path)
    assert torch.equal(manager.string_to_param_dict["*"],
                       ordinary.string_to_param_dict["*"].detach().expand(len(TINY_LAYERS), -1, -1))


# ------------------------------------------------------------------------------------------------ main.py
def test_main_trains_per_layer_vectors_and_the_scripts_sample_them(tmp_path, tiny_ckpt, concept_dir, tiny_config):
    import main as entry
    logs = tmp_path / "logs"
    entry.main(["--base", str(ROOT / "configs/tiny/finetune-tiny.yaml"), str(ROOT / "configs/toy/recipes/xti.yaml"),
                "-t", "--actual_resume", str(tiny_ckpt), "--data_root", str(concept_dir), "--init_word", "triangle",
                "-l", str(logs), "--max_steps", "3", "lightning.callbacks.image_logger.params.batch_frequency=2"])
    (run,) = glob.glob(os.path.join(str(logs), "*"))
    path = os.path.join(run, "checkpoints", "embeddings.pt")
    xti = read_xti_file(path)
    assert xti.layers == TINY_LAYERS and xti.step == 3
    vectors = xti.vectors["*"]
    start = build_tiny_model(tiny_config).embedding_manager.string_to_param_dict["*"].detach()
    moves = (vectors - start).flatten(1)
    assert (moves.norm(dim=1) > 0).all()  # every layer trained ...
    assert not torch.allclose(moves[0], moves[-1])  # ... each in its own way
    assert list((Path(run) / "images" / "train").glob("*.jpg"))  # log_images sampled the per-layer word

    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config, config)
    args = ["--config", str(config), "--ckpt", str(tiny_ckpt), "--n_samples", "2", "--n_iter", "1", "--ddim_steps",
            "3", "--H", "32", "--W", "32", "--f", "4", "--C", "4", "--device", "cpu", "--skip_grid",
            "--prompt", "a photo of *", "--outdir", str(tmp_path / "out")]
    stable_txt2img = load_script("stable_txt2img")
    plain = stable_txt2img.main(args)
    learned = stable_txt2img.main(args + ["--embedding_path", path])
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(learned[0])))


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "models/toy/shapes-ldm.safetensors").is_file(), reason="no toy model here")
def test_benchmark_trains_and_scores_the_xti_recipe(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "bench"
    cmd = [sys.executable, "scripts/benchmark_concepts.py", "--outdir", str(out), "--concepts",
           "blue-circle-large-right", "--max_steps", "2", "--n_samples", "2", "--ddim_steps", "2", "--curve_every",
           "1", "--curve_samples", "2", "--curve_ddim_steps", "2",
           "--recipe", "configs/toy/finetune-shapes.yaml", "configs/toy/recipes/xti.yaml"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "blue-circle-large-right" / "result.json").read_text())
    assert [h["step"] for h in result["curve"]] == [0, 1, 2]  # the learning curve sampled the per-layer word
    xti = read_xti_file(Path(result["run"]) / "checkpoints/embeddings.pt")
    assert xti.layers == ("IN01", "IN03", "MID", "OUT00", "OUT01", "OUT02", "OUT03")
    assert xti.vectors["*"].shape == (7, 48, 64)
