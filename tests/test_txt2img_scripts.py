"""scripts/stable_txt2img.py and scripts/txt2img.py, run end to end on the tiny LDM on CPU."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


stable_txt2img = load_script("stable_txt2img")
txt2img = load_script("txt2img")


@pytest.fixture
def tiny_args(tmp_path, tiny_config, tiny_ckpt):
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config, config)
    return ["--config", str(config), "--ckpt", str(tiny_ckpt), "--n_samples", "2", "--n_iter", "1",
            "--ddim_steps", "3", "--H", "32", "--W", "32", "--f", "4", "--C", "4", "--precision", "full",
            "--device", "cpu", "--outdir", str(tmp_path / "out")]


def pixels(path):
    return np.asarray(Image.open(path))


def test_writes_samples_and_grid(tmp_path, tiny_args):
    written = stable_txt2img.main(tiny_args + ["--prompt", "a photo of *"])
    out = tmp_path / "out"
    assert [Path(p).name for p in written] == ["00000.png", "00001.png", "a-photo-of-0000.png"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert pixels(out / "samples" / "00000.png").shape == (32, 32, 3)
    # two 32 px images side by side with 2 px padding
    assert pixels(out / "a-photo-of-0000.png").shape == (36, 70, 3)


def test_numbering_continues_and_seed_reproduces(tmp_path, tiny_args):
    first = stable_txt2img.main(tiny_args + ["--seed", "7"])
    second = stable_txt2img.main(tiny_args + ["--seed", "7"])
    third = stable_txt2img.main(tiny_args + ["--seed", "8", "--skip_grid"])
    assert [Path(p).name for p in second] == ["00002.png", "00003.png", "a-painting-of-a-virus-monster-playing-guitar-0001.png"]
    assert [Path(p).name for p in third] == ["00004.png", "00005.png"]
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    assert not np.array_equal(pixels(first[0]), pixels(third[0]))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))


def test_skip_save_writes_only_the_grid(tmp_path, tiny_args):
    written = stable_txt2img.main(tiny_args + ["--skip_save", "--n_rows", "1"])
    assert len(written) == 1 and not list((tmp_path / "out" / "samples").iterdir())
    assert pixels(written[0]).shape == (70, 36, 3)  # one image per row


def test_plms_fixed_code_prompts_from_file_and_autocast(tmp_path, tiny_args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na photo of *\n")
    written = stable_txt2img.main(tiny_args + ["--plms", "--fixed_code", "--from-file", str(prompts),
                                               "--precision", "autocast", "--scale", "3"])
    # three prompts in batches of two: 2 + 1 samples, then the grid
    assert [Path(p).name for p in written] == ["00000.png", "00001.png", "00002.png", "grid-0000.png"]
    # the fixed start code is shared by both batches
    assert all(pixels(p).shape == (32, 32, 3) for p in written[:3])


@pytest.mark.parametrize("precision,dtype", [("autocast", torch.bfloat16), ("full", torch.float32)])
def test_autocast_stores_the_frozen_unet_in_its_dtype(tiny_args, precision, dtype):
    """Under --precision autocast the UNet's torso is kept in bf16 (CPU), not re-cast at every step."""
    from ldm.txt2img_common import build_parser, load_model
    opt = build_parser("test").parse_args(tiny_args[:4] + ["--device", "cpu", "--precision", precision])
    unet = load_model(opt).model.diffusion_model
    torso = [m for part in (unet.input_blocks, unet.middle_block, unet.output_blocks) for m in part.modules()]
    convs = [m for m in torso if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in torso if isinstance(m, torch.nn.GroupNorm)]
    assert convs and all(m.weight.dtype == dtype for m in convs)
    assert norms and all(m.weight.dtype == dtype for m in norms)  # bf16 on CPU: norms too, as diffusers runs it


def test_embedding_file_is_loaded_and_changes_the_images(tmp_path, tiny_args, tiny_config):
    from conftest import build_tiny_model
    model = build_tiny_model(tiny_config)
    manager = model.embedding_manager
    with torch.no_grad():
        for param in manager.string_to_param_dict.values():
            param.add_(torch.randn_like(param) * 5)
    embedding = tmp_path / "embeddings.pt"
    manager.save(str(embedding))
    args = tiny_args + ["--prompt", "a photo of *", "--skip_grid"]
    plain = stable_txt2img.main(args)
    learned = stable_txt2img.main(args + ["--embedding_path", str(embedding)])
    assert not np.array_equal(pixels(plain[0]), pixels(learned[0]))
    # the same vectors under another placeholder string
    renamed = stable_txt2img.main(tiny_args + ["--prompt", "a photo of sks", "--skip_grid", "--embedding_path",
                                               str(embedding), "--placeholder_string", "sks"])
    assert np.array_equal(pixels(learned[0]), pixels(renamed[0]))
    with pytest.raises(SystemExit, match="Could not load embeddings"):
        stable_txt2img.main(args + ["--embedding_path", str(embedding), "--placeholder_string", "a", "b"])
    # '*,' is one CLIP token: the concept would silently not be used
    with pytest.warns(UserWarning, match=r"'\*' merges with the characters next to it"):
        stable_txt2img.main(tiny_args + ["--prompt", "a photo of *, at night", "--skip_grid", "--embedding_path",
                                         str(embedding)])


@pytest.mark.parametrize("flag,path,message", [
    ("--ckpt", "missing/model.ckpt", "Checkpoint not found: missing/model.ckpt"),
    ("--config", "missing/config.yaml", "Config not found: missing/config.yaml"),
    ("--embedding_path", "missing/embeddings.pt", "Embedding file not found: missing/embeddings.pt"),
])
def test_missing_files_are_named(tiny_args, flag, path, message):
    with pytest.raises(SystemExit, match=message):
        stable_txt2img.main(tiny_args + [flag, path])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error(tiny_args):
    with pytest.raises(SystemExit, match="--device cuda is not available"):
        stable_txt2img.main(tiny_args + ["--device", "cuda"])


def test_embedding_without_personalization_config_is_refused(tmp_path, tiny_args, tiny_config):
    config = OmegaConf.create(OmegaConf.to_container(tiny_config))
    del config.model.params.personalization_config
    path = tmp_path / "plain.yaml"
    OmegaConf.save(config, path)
    embedding = tmp_path / "embeddings.pt"
    embedding.write_bytes(b"")
    with pytest.raises(SystemExit, match="no personalization_config"):
        stable_txt2img.main(tiny_args + ["--config", str(path), "--embedding_path", str(embedding)])


def test_ldm_script_keeps_its_own_defaults_and_the_ckpt_path_flag(tmp_path, tiny_args):
    with pytest.raises(SystemExit, match="Checkpoint not found: models/ldm/text2img-large/model.ckpt"):
        txt2img.main(["--config", tiny_args[1]])
    written = txt2img.main(tiny_args[:2] + ["--ckpt_path"] + tiny_args[3:] + ["--skip_grid"])
    assert len(written) == 2


def test_stable_defaults_are_the_originals():
    from ldm.txt2img_common import build_parser
    opt = build_parser("test").parse_args([])
    assert (opt.H, opt.W, opt.f, opt.C, opt.ddim_steps, opt.n_iter, opt.n_samples, opt.scale, opt.seed) == \
        (512, 512, 8, 4, 50, 2, 3, 7.5, 42)
    assert opt.config == "configs/stable-diffusion/v1-inference.yaml"
    assert opt.ckpt == "models/ldm/stable-diffusion-v1/model.ckpt"
    assert opt.precision == "autocast" and opt.device in ("cuda", "mps", "cpu")


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_sampler_flag_is_seeded_and_used(tmp_path, tiny_args, sampler):
    args = tiny_args + ["--skip_grid", "--prompt", "a red circle"]
    ddim = stable_txt2img.main(args)
    first = stable_txt2img.main(args + ["--sampler", sampler])
    second = stable_txt2img.main(args + ["--sampler", sampler])
    other_seed = txt2img.main(args + ["--sampler", sampler, "--seed", "1"])
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    assert not np.array_equal(pixels(first[0]), pixels(ddim[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other_seed[0]))


@pytest.mark.parametrize("flags,message", [
    (["--plms", "--sampler", "euler"], "--plms and --sampler euler disagree"),
    (["--sampler", "unipc", "--ddim_eta", "0.5"], "--ddim_eta applies to DDIM only"),
    (["--plms", "--ddim_eta", "0.5"], "--ddim_eta applies to DDIM only"),
])
def test_sampler_flag_conflicts_are_named(tiny_args, flags, message):
    with pytest.raises(SystemExit, match=message):
        stable_txt2img.main(tiny_args + flags)


def test_unknown_sampler_is_refused_by_the_parser(capsys):
    from ldm.txt2img_common import build_parser
    with pytest.raises(SystemExit):
        build_parser("test").parse_args(["--sampler", "dpm++"])
    assert "invalid choice: 'dpm++'" in capsys.readouterr().err


def test_one_prompt_to_filename_rule():
    from ldm.txt2img_common import prompt_to_filename
    assert prompt_to_filename("a photo of *", "grid") == "a-photo-of"
    assert prompt_to_filename("ein Foto von * (v2.0) — groß", "x") == "ein-Foto-von-v2-0-gro"
    assert prompt_to_filename("***", "prompt") == "prompt"
    assert len(prompt_to_filename("a" * 300, "x")) == 100


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(tmp_path, tiny_args, capsys):
    """--negative_prompt: the unconditional side of guidance; "" is the default; a loaded embedding's word
    (an AUTOMATIC1111 file, as EasyNegative is used) works there."""
    from ldm.modules.embedding_io import save_embedding_file
    args = tiny_args + ["--skip_grid", "--prompt", "a red circle", "--scale", "5"]
    default = stable_txt2img.main(args)
    empty = stable_txt2img.main(args + ["--negative_prompt", ""])
    negative = stable_txt2img.main(args + ["--negative_prompt", "a blue square"])
    assert np.array_equal(pixels(default[0]), pixels(empty[0]))
    assert not np.array_equal(pixels(default[0]), pixels(negative[0]))
    easy = save_embedding_file(tmp_path / "EasyNegative.safetensors",
                               {"x": 3 * torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                               fmt="a1111-safetensors")
    word = txt2img.main(args + ["--negative_prompt", "EasyNegative", "--embedding_path", str(easy)])
    bare = txt2img.main(args + ["--negative_prompt", "EasyNegative"])
    assert not np.array_equal(pixels(word[0]), pixels(bare[0]))
    with pytest.raises(SystemExit):
        stable_txt2img.main(tiny_args + ["--negative_prompt", "blurry", "--scale", "1"])
    assert "--negative_prompt works through guidance, which --scale 1 switches off" in capsys.readouterr().err
