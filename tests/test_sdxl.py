"""SDXL in LatentDiffusion (`conditioner_config`, `conditioning_key: crossattn-adm`) and the tiny SD 2.x v model,
end to end: the full-size configs on the meta device, the official key layout loading strictly, `main.py -t`
changing only the embeddings (image logging on), the embedding files, and sampling with `--embedding_path`."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import build_tiny_model, load_script, write_concept_images
from ldm.checkpoint import CheckpointError, load_model_from_config, load_state_dict, save_state_dict
from ldm.models.diffusion.textual_inversion import EmbeddingLoadError, load_embeddings
from ldm.modules.embedding_io import load_embedding_file
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
SDXL_CONFIGS = ["sd_xl_base-inference.yaml", "sd_xl_base-finetune.yaml"]
TINY_SDXL = ROOT / "configs/tiny/sdxl-finetune-tiny.yaml"
TINY_SD2_V = ROOT / "configs/tiny/sd2-v-finetune-tiny.yaml"
PREFIXES = ("model.diffusion_model.", "conditioner.", "first_stage_model.")


@pytest.mark.parametrize("name", SDXL_CONFIGS)
def test_full_size_sdxl_config_has_the_official_sizes_and_key_layout(name):
    params = OmegaConf.load(ROOT / "configs/stable-diffusion-xl" / name).model.params
    assert params.scale_factor == 0.13025 and params.conditioning_key == "crossattn-adm"
    assert params.linear_start == 0.00085 and params.linear_end == 0.012 and params.timesteps == 1000
    with torch.device("meta"):
        unet = instantiate_from_config(params.unet_config)
        conditioner = instantiate_from_config(params.conditioner_config)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    keys = set(unet.state_dict())
    assert {"label_emb.0.0.weight", "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"} <= keys
    assert unet.state_dict()["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    ckeys = set(conditioner.state_dict())
    assert "embedders.0.transformer.text_model.embeddings.token_embedding.weight" in ckeys
    assert "embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in ckeys
    assert [e.embedding_key for e in conditioner.text_encoders] == ["clip_l", "clip_g"]


def tiny_sdxl_weights(tmp_path):
    model = build_tiny_model(OmegaConf.load(TINY_SDXL))
    # what an official SDXL checkpoint holds: the three parts, no schedule, no embeddings
    official = {k: v for k, v in model.state_dict().items() if k.startswith(PREFIXES)}
    path = tmp_path / "tiny-sdxl.safetensors"
    save_state_dict(official, str(path))
    return model, official, path


def test_tiny_sdxl_model_has_the_official_layout_and_loads_it_strictly(tmp_path):
    model, official, path = tiny_sdxl_weights(tmp_path)
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained == {"embedding_manager.managers.clip_l.string_to_param_dict.*",
                       "embedding_manager.managers.clip_g.string_to_param_dict.*"}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in official)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in official)
    loaded = load_model_from_config(OmegaConf.load(TINY_SDXL), str(path), verbose=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in official.items())
    del official["conditioner.embedders.1.model.ln_final.weight"]
    save_state_dict(official, str(path))
    with pytest.raises(CheckpointError, match="ln_final"):
        load_model_from_config(OmegaConf.load(TINY_SDXL), str(path), verbose=False)


def test_size_keys_come_from_the_data_and_default_to_the_image_size(concept_dir):
    from ldm.data.personalized import PersonalizedBase
    from ldm.models.diffusion.conditioning import conditioner_batch
    example = PersonalizedBase(str(concept_dir), size=16, size_conditioning=True)[0]
    assert example["original_size_as_tuple"].tolist() == [32, 32]
    assert example["target_size_as_tuple"].tolist() == [16, 16]
    assert example["crop_coords_top_left"].tolist() == [0, 0]
    assert "target_size_as_tuple" not in PersonalizedBase(str(concept_dir), size=16)[0]
    wide = concept_dir.parent / "wide"
    wide.mkdir()
    Image.new("RGB", (48, 32), "white").save(wide / "wide.png")  # (width, height)
    example = PersonalizedBase(str(wide), size=16, center_crop=True, size_conditioning=True)[0]
    # the 32 x 32 centre square starts 8 px from the left: 4 px at the output's scale (16 / 32)
    assert example["original_size_as_tuple"].tolist() == [32, 48]
    assert example["crop_coords_top_left"].tolist() == [0, 4]
    batch = conditioner_batch(["a", "b"], 64, 48)
    assert batch["original_size_as_tuple"].tolist() == [[64, 48]] * 2 and batch["crop_coords_top_left"].sum() == 0


def train(tmp_path, config_path, base_model, name):
    """`main.py -t` for 4 steps with image logging every 2 steps; -> (trained module, run folder)."""
    import main as entry
    ckpt = tmp_path / f"{name}.safetensors"
    save_state_dict({k: v for k, v in base_model.state_dict().items() if not k.startswith("embedding_manager.")},
                    str(ckpt))
    concept = write_concept_images(tmp_path / "concept")
    logs = tmp_path / "logs"
    trainer = entry.main(["--base", str(config_path), "-t", "--actual_resume", str(ckpt), "--data_root",
                          str(concept), "--init_word", "triangle", "-l", str(logs), "--max_steps", "4",
                          "lightning.callbacks.image_logger.params.batch_frequency=2",
                          "lightning.modelcheckpoint.params.every_n_train_steps=4"])
    (run,) = logs.iterdir()
    return trainer.lightning_module, run, ckpt


def unchanged(trained, ckpt):
    now = trained.state_dict()
    saved = load_state_dict(str(ckpt))
    return all(torch.equal(now[k].cpu(), saved[k]) for k in saved)


def sample(tmp_path, config, ckpt, out, embedding=None, script="stable_txt2img", extra=()):
    args = ["--config", str(config), "--ckpt", str(ckpt), "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3",
            "--H", "32", "--W", "32", "--f", "4", "--C", "4", "--precision", "full", "--device", "cpu",
            "--seed", "3", "--scale", "5", "--skip_grid", "--outdir", str(tmp_path / out), "--prompt", "a photo of *"]
    written = load_script(script).main(args + (["--embedding_path", str(embedding)] if embedding else []) + list(extra))
    assert len(written) == 1 and Path(written[0]).is_file()
    return np.asarray(Image.open(written[0]))


def test_main_trains_a_tiny_sdxl_model_and_samples_with_its_embeddings(tmp_path):
    config = OmegaConf.load(TINY_SDXL)
    model = build_tiny_model(config)
    trained, run, ckpt = train(tmp_path, TINY_SDXL, model, "tiny-sdxl")
    assert trained.conditioner is not None and trained.cond_stage_model is None
    assert list((run / "images/train").glob("samples_scaled_*.jpg")), "image logging wrote no samples"
    for key, manager in trained.embedding_manager.managers.items():
        assert not torch.allclose(manager.string_to_param_dict["*"].cpu(), manager.initial_embeddings["*"].cpu()), key
    assert unchanged(trained, ckpt)  # UNet, autoencoder and both text encoders bit-identical
    official = torch.load(run / "checkpoints/embeddings.pt", weights_only=True)
    assert official["string_to_param"]["clip_l"]["*"].shape == (1, 32)
    assert official["string_to_param"]["clip_g"]["*"].shape == (1, 32)
    a1111 = load_embedding_file(run / "checkpoints/embeddings.safetensors", target_widths=(32, 32))
    for key, manager in trained.embedding_manager.managers.items():
        (vectors,) = a1111.by_encoder[key].values()  # one concept, named after the file
        assert torch.equal(vectors.float(), manager.string_to_param_dict["*"].detach().cpu().float())
    # sampling: with the trained file the picture differs from the init word's
    before = sample(tmp_path, TINY_SDXL, ckpt, "before")
    after = sample(tmp_path, TINY_SDXL, ckpt, "after", run / "checkpoints/embeddings.pt")
    # the AUTOMATIC1111 file names its concept after the file: --placeholder_string gives it the word "*"
    again = sample(tmp_path, TINY_SDXL, ckpt, "again", run / "checkpoints/embeddings.safetensors", script="txt2img",
                   extra=["--placeholder_string", "*"])
    assert not np.array_equal(before, after) and np.array_equal(after, again)


def test_main_trains_a_tiny_sd2_v_model_with_image_logging_and_samples_with_it(tmp_path):
    model = build_tiny_model(OmegaConf.load(TINY_SD2_V))
    trained, run, ckpt = train(tmp_path, TINY_SD2_V, model, "tiny-sd2-v")
    assert trained.prediction.kind == "v"
    assert list((run / "images/train").glob("samples_placeholder_*.jpg")), "image logging wrote no samples"
    assert unchanged(trained, ckpt)
    before = sample(tmp_path, TINY_SD2_V, ckpt, "before")
    after = sample(tmp_path, TINY_SD2_V, ckpt, "after", run / "checkpoints/embeddings.pt")
    assert not np.array_equal(before, after)


def test_a_one_encoder_file_is_refused_for_sdxl_naming_both(tmp_path):
    model = build_tiny_model(OmegaConf.load(TINY_SDXL))
    path = tmp_path / "one-encoder.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 32)}}, path)
    # tiny widths are no known family, so the message names the widths of both (full size: "SD v1" and "SDXL",
    # test_embedding_path_refuses_an_sdxl_file_for_sd_v1_naming_both)
    with pytest.raises(EmbeddingLoadError, match=r"one-encoder.pt is .*\(32 wide\); this model is .*\(32 \+ 32 wide\)"):
        load_embeddings(model, [str(path)])


def test_sdxl_guidance_uses_zeroed_text_and_every_sampler_takes_the_dict_conditioning():
    from ldm.models.diffusion.generate import generate
    model = build_tiny_model(OmegaConf.load(TINY_SDXL))
    cond, uncond = model.sampling_conditioning(["a photo of *", "a cat"], guided=True, shape=(4, 8, 6))
    assert cond["c_crossattn"][0].shape == (2, 77, 64) and cond["y"].shape == (2, 72)
    assert not uncond["c_crossattn"][0].any() and not uncond["y"][:, :24].any()  # text and pooled text zeroed
    # the size embeddings are kept: (height, width) = (32, 24) pixels for 8 x 6 latents
    assert torch.equal(uncond["y"][:, 24:], cond["y"][:, 24:])
    sizes = model.conditioner.embedders[2](torch.tensor([[32, 24]]))
    assert torch.allclose(cond["y"][:1, 24:40], sizes)
    images = {}
    for sampler in ("ddim", "plms", "dpmpp_2m", "euler_a"):
        images[sampler] = generate(model, ["a photo of *"], sampler, 3, 5.0, generator=torch.Generator().manual_seed(0))
        assert images[sampler].shape == (1, 3, 32, 32) and torch.isfinite(images[sampler]).all()
    unguided = generate(model, ["a photo of *"], "ddim", 3, 1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(unguided, images["ddim"])


def test_sdxl_negative_prompt_is_encoded_not_zeroed():
    """A negative prompt is the unconditional text (encoded, as diffusers' SDXL pipeline does); "" keeps
    Stability's zeroed text."""
    model = build_tiny_model(OmegaConf.load(TINY_SDXL))
    prompts = ["a photo of *", "a cat"]
    _, default = model.sampling_conditioning(prompts, guided=True, shape=(4, 8, 6))
    _, empty = model.sampling_conditioning(prompts, guided=True, shape=(4, 8, 6), negative_prompts=["", ""])
    cond, negative = model.sampling_conditioning(prompts, guided=True, shape=(4, 8, 6),
                                                 negative_prompts=2 * ["blurry"])
    assert torch.equal(default["c_crossattn"][0], empty["c_crossattn"][0]) and torch.equal(default["y"], empty["y"])
    assert negative["c_crossattn"][0].abs().sum() > 0 and negative["y"][:, :24].abs().sum() > 0
    expected, _ = model.sampling_conditioning(2 * ["blurry"], guided=True, shape=(4, 8, 6))
    assert torch.allclose(negative["c_crossattn"][0], expected["c_crossattn"][0])


def test_xti_on_a_two_encoder_model_is_refused_naming_the_option():
    config = OmegaConf.load(TINY_SDXL)
    config.model.params.personalization_config.target = "ldm.modules.xti.XTIEmbeddingManager"
    with pytest.raises(ValueError, match="XTI.*one text encoder.*MultiEmbeddingManager"):
        build_tiny_model(config)
