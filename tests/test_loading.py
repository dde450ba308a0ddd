"""Loading builds the weights a file fills empty (on the meta device) and takes the file's tensors: nothing may be
left on meta, every weight must be the file's in the model's dtype, and what the file does not hold (the noise
schedule, the embedding manager, buffers such as CLIP's position ids) must be what a normally built model has."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, build_tiny_model
from ldm.checkpoint import CheckpointError, load_model_from_config, save_state_dict
from ldm.util import instantiate_from_config, meta_tensor_names, parameters_on_meta

TINY_CONFIGS = ["configs/tiny/finetune-tiny.yaml", "configs/tiny/sd2-v-finetune-tiny.yaml",
                "configs/tiny/sdxl-finetune-tiny.yaml"]
NETWORKS = ("model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def write_weights(model, path, half):
    """The model's weights as a file in the official layout; `half`: networks in fp16 (how SD files ship)."""
    sd = {k: v.half() if half and k.startswith(NETWORKS) and v.is_floating_point() else v
          for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    save_state_dict(sd, str(path))
    return sd


def manager_vectors(model):
    return {k: v for k, v in model.embedding_manager.state_dict().items() if "initial_embeddings" in k}


@pytest.mark.parametrize("config_path", TINY_CONFIGS)
@pytest.mark.parametrize("suffix,half", [(".safetensors", True), (".ckpt", True), (".ckpt", False)])
def test_a_loaded_model_holds_the_files_weights_and_builds_the_rest_for_real(tmp_path, config_path, suffix, half):
    config = OmegaConf.load(ROOT / config_path)
    reference = build_tiny_model(config)
    sd = write_weights(reference, tmp_path / f"w{suffix}", half)
    model = load_model_from_config(config, str(tmp_path / f"w{suffix}"), verbose=False)
    assert meta_tensor_names(model) == []
    state = model.state_dict()
    for key, value in sd.items():
        assert state[key].dtype == reference.state_dict()[key].dtype, key  # fp16 files load as the model's fp32
        assert torch.equal(state[key], value.to(state[key].dtype)), key
    # not in the file: the non-persistent buffers (lvlb weights, logvar, position ids) as a normal build makes them
    for key, value in reference.named_buffers():
        if key not in sd and not key.startswith("embedding_manager."):
            assert torch.equal(dict(model.named_buffers())[key], value), key
    # the manager starts from the LOADED text encoder's embedding of the initializer word
    ref_vectors = manager_vectors(reference)
    got = manager_vectors(model)
    assert got.keys() == ref_vectors.keys() and ref_vectors
    for k in ref_vectors:
        assert torch.allclose(got[k], ref_vectors[k], atol=1e-3 if half else 0), k
    assert all(p.requires_grad for p in model.embedding_manager.embedding_parameters())
    assert not any(p.requires_grad for p in model.model.parameters())


def test_training_from_actual_resume_builds_from_the_file(tmp_path):
    """main.py passes --actual_resume as model.params.ckpt_path: the constructor's path."""
    config = OmegaConf.load(ROOT / TINY_CONFIGS[0])
    reference = build_tiny_model(config)
    sd = write_weights(reference, tmp_path / "base.safetensors", half=False)
    config.model.params.ckpt_path = str(tmp_path / "base.safetensors")
    model = instantiate_from_config(config.model)
    assert meta_tensor_names(model) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(manager_vectors(model)["initial_embeddings.*"], manager_vectors(reference)["initial_embeddings.*"])
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a photo of *"] * 2}
    model.train()
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert model.embedding_manager.string_to_param_dict["*"].grad is not None


def test_a_first_stage_with_its_own_ckpt_path_inside_a_model_built_empty(tmp_path):
    """A first stage loading its own file in the model's constructor takes it by assignment too; the model's file
    then fills it (the order of the original)."""
    config = OmegaConf.load(ROOT / TINY_CONFIGS[0])
    reference = build_tiny_model(config)
    vae = {k[len("first_stage_model."):]: v * 0 + 1 for k, v in reference.state_dict().items()
           if k.startswith("first_stage_model.")}
    save_state_dict(vae, str(tmp_path / "vae.safetensors"))
    config.model.params.first_stage_config.params.ckpt_path = str(tmp_path / "vae.safetensors")
    with parameters_on_meta():
        first_stage = instantiate_from_config(config.model.params.first_stage_config)
    assert meta_tensor_names(first_stage) == []
    assert all(torch.equal(v, torch.ones_like(v)) for v in first_stage.state_dict().values())
    sd = write_weights(reference, tmp_path / "w.safetensors", half=False)
    model = load_model_from_config(config, str(tmp_path / "w.safetensors"), verbose=False)
    assert meta_tensor_names(model) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if k.startswith("first_stage_model."))


def test_a_run_checkpoint_with_the_managers_vectors_fills_the_manager(tmp_path):
    config = OmegaConf.load(ROOT / TINY_CONFIGS[0])
    reference = build_tiny_model(config)
    with torch.no_grad():
        reference.embedding_manager.string_to_param_dict["*"].fill_(0.5)
    save_state_dict(reference.state_dict(), str(tmp_path / "run.safetensors"))
    model = load_model_from_config(config, str(tmp_path / "run.safetensors"), verbose=False)
    assert torch.equal(model.embedding_manager.string_to_param_dict["*"].detach(),
                       torch.full_like(model.embedding_manager.string_to_param_dict["*"], 0.5))


def test_a_file_lacking_weights_is_refused_and_the_meta_patch_is_undone(tmp_path):
    config = OmegaConf.load(ROOT / TINY_CONFIGS[0])
    sd = write_weights(build_tiny_model(config), tmp_path / "w.safetensors", half=False)
    del sd["model.diffusion_model.out.2.weight"]
    save_state_dict(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="out.2.weight"):
        load_model_from_config(config, str(tmp_path / "w.safetensors"), verbose=False)
    assert not torch.nn.Linear(2, 2).weight.is_meta  # parameters_on_meta restored nn.Module on the way out


def test_parameters_on_meta_keeps_buffers_real():
    with parameters_on_meta():
        norm = torch.nn.BatchNorm1d(3)
    assert norm.weight.is_meta and norm.bias.is_meta
    assert not norm.running_mean.is_meta and torch.equal(norm.running_var, torch.ones(3))
    assert meta_tensor_names(norm) == ["weight", "bias"]


def test_a_legacy_pickle_in_fp16_is_cast_where_it_was_read(tmp_path):
    """Files torch wrote before its zip format cannot be mapped: they are read once and cast in place."""
    config = OmegaConf.load(ROOT / TINY_CONFIGS[0])
    reference = build_tiny_model(config)
    sd = {k: v.half() if k.startswith(NETWORKS) else v for k, v in reference.state_dict().items()
          if not k.startswith("embedding_manager.")}
    torch.save({"state_dict": sd}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    model = load_model_from_config(config, str(tmp_path / "legacy.ckpt"), verbose=False)
    assert meta_tensor_names(model) == []
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in sd.items() if v.is_floating_point())
