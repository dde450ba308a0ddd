"""configs/stable-diffusion/v2-*.yaml: Stability's SD 2.x model, our text encoder and the textual-inversion manager.

The full-size parts are built on the meta device (no memory, no weights); the whole LatentDiffusion of each
config is built with tiny widths and takes a real textual-inversion step.
"""
import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import build_tiny_model
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["v2-inference.yaml", "v2-inference-v.yaml", "v2-finetune.yaml", "v2-finetune-v.yaml"]


def load(name):
    return OmegaConf.load(ROOT / "configs/stable-diffusion" / name)


@pytest.mark.parametrize("name", CONFIGS)
def test_full_size_parts_have_the_official_sizes_and_keys(name):
    params = load(name).model.params
    assert params.get("parameterization", "eps") == ("v" if "-v" in name else "eps")
    assert params.scale_factor == 0.18215 and params.linear_start == 0.00085 and params.linear_end == 0.012
    with torch.device("meta"):
        unet = instantiate_from_config(params.unet_config)
        text = instantiate_from_config(params.cond_stage_config)
        first_stage = instantiate_from_config(params.first_stage_config)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert unet.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert unet.state_dict()["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    # ViT-H/14 text tower (+ text_projection and logit_scale, kept from the checkpoint), SD's KL autoencoder
    assert sum(p.numel() for p in text.parameters()) == 352_984_064 + 1_048_576 + 1
    assert text.embedding_dim == 1024 and text.layer == "penultimate"
    assert sum(p.numel() for p in first_stage.parameters()) == 83_653_863


def tiny(config):
    """The config with every width shrunk; its structure (linear projections, head width, v or eps) kept."""
    config = copy.deepcopy(config)
    params = config.model.params
    params.image_size = 8
    params.scale_factor = 1.0
    params.unet_config.params.update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2, 1],
                                      num_res_blocks=1, num_head_channels=16, context_dim=32)
    params.cond_stage_config.params.config = {"width": 32, "layers": 2, "heads": 2}
    tiny_first_stage = OmegaConf.load(ROOT / "configs/tiny/finetune-tiny.yaml").model.params.first_stage_config
    params.first_stage_config = tiny_first_stage
    return config


@pytest.mark.parametrize("name", ["v2-finetune.yaml", "v2-finetune-v.yaml"])
def test_tiny_sd2_finetune_config_trains_only_the_placeholder(name):
    config = tiny(load(name))
    model = build_tiny_model(config)
    assert model.prediction.kind == ("v" if "-v" in name else "eps")
    assert model.model.diffusion_model.state_dict()["input_blocks.1.1.proj_in.weight"].ndim == 2
    assert model.embedding_manager.string_to_param_dict["*"].shape == (1, 32)
    model.train()
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a photo of *", "a rendition of *"]}
    loss, loss_dict = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss)
    vector = model.embedding_manager.string_to_param_dict["*"]
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.cond_stage_model.parameters())
    assert all(p.grad is None for p in model.model.parameters())


def test_finetune_configs_differ_from_inference_only_where_training_needs():
    for inference, finetune in (("v2-inference.yaml", "v2-finetune.yaml"),
                                ("v2-inference-v.yaml", "v2-finetune-v.yaml")):
        a, b = load(inference).model.params, load(finetune).model.params
        assert a.unet_config == b.unet_config and a.cond_stage_config == b.cond_stage_config
        assert a.personalization_config == b.personalization_config
        assert load(finetune).model.base_learning_rate == 0.005
    assert load("v2-finetune-v.yaml").data.params.train.params.size == 768
    assert load("v2-finetune.yaml").data.params.train.params.size == 512


def test_main_trains_a_tiny_v_prediction_sd2_model(tmp_path):
    """`main.py -t` end to end (real Lightning trainer) on v2-finetune-v.yaml with tiny widths and data: the
    embedding file holds a changed 1024-style vector (here 32 wide) and nothing else of the model moved."""
    import main as entry
    from conftest import write_concept_images
    from ldm.checkpoint import load_state_dict, save_state_dict
    config = tiny(load("v2-finetune-v.yaml"))
    tiny_data = OmegaConf.load(ROOT / "configs/tiny/finetune-tiny.yaml")
    config.data, config.lightning = tiny_data.data, tiny_data.lightning
    config_path = tmp_path / "v2-finetune-v-tiny.yaml"
    OmegaConf.save(config, config_path)
    model = build_tiny_model(config)
    base = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    ckpt = tmp_path / "tiny-sd2-v.safetensors"
    save_state_dict(base, str(ckpt))
    concept = write_concept_images(tmp_path / "concept")
    logs = tmp_path / "logs"
    # image logging off to keep this test short; tests/test_sdxl.py trains the same tiny v config with it on
    trainer = entry.main(["--base", str(config_path), "-t", "--actual_resume", str(ckpt), "--data_root",
                          str(concept), "--init_word", "triangle", "-l", str(logs), "--max_steps", "4",
                          "lightning.callbacks.image_logger.params.disabled=true"])
    trained = trainer.lightning_module
    assert trained.prediction.kind == "v"
    (run,) = logs.iterdir()
    learned = torch.load(run / "checkpoints/embeddings.pt", weights_only=True)["string_to_param"]["*"]
    assert learned.shape == (1, 32)
    assert not torch.allclose(learned, trained.embedding_manager.initial_embeddings["*"].cpu())
    now = trained.state_dict()
    saved = load_state_dict(str(ckpt))
    assert all(torch.equal(now[k].cpu(), saved[k]) for k in saved)
