"""bf16 mixed precision trains the embedding as fp32 does (real Lightning, tiny model, a few steps)."""
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from conftest import ROOT, build_tiny_model


class ConceptImages(Dataset):
    """Three fixed random images of the concept, captioned with the placeholder, as the personalized dataset."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(3, 32, 32, 3, generator=g) * 2 - 1

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": "a photo of *", "cache_key": f"img-{i}"}


def train(precision, steps=6):
    config = OmegaConf.load(ROOT / "configs/tiny/finetune-tiny.yaml")
    model = build_tiny_model(config, seed=0).train()
    model.learning_rate = 5e-3
    before = model.embedding_manager.string_to_param_dict["*"].detach().clone()
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(ConceptImages(), batch_size=3))
    after = model.embedding_manager.string_to_param_dict["*"].detach()
    return (after - before).flatten(), model


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    return {p: train(p) for p in ("32-true", "bf16-mixed")}


def test_bf16_mixed_moves_the_embedding_like_fp32(runs):
    fp32, _ = runs["32-true"]
    bf16, _ = runs["bf16-mixed"]
    assert torch.isfinite(bf16).all()
    assert fp32.norm() > 1e-3 and bf16.norm() > 1e-3  # both learned something
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0)
    assert cosine > 0.9, f"bf16 moved the embedding elsewhere (cosine {cosine:.3f} with fp32)"
    assert 0.7 < (bf16.norm() / fp32.norm()).item() < 1.4


def test_bf16_mixed_stores_the_frozen_unet_in_bf16_and_keeps_the_embedding_fp32(runs):
    _, fp32_model = runs["32-true"]
    _, bf16_model = runs["bf16-mixed"]
    unet = bf16_model.model.diffusion_model
    assert unet.dtype == torch.bfloat16
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert unet.out[2].weight.dtype == torch.float32  # outside the torso, as the fp16 torso of the original
    assert bf16_model.embedding_manager.string_to_param_dict["*"].dtype == torch.float32
    assert fp32_model.model.diffusion_model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fp32_model.model.parameters())
    # the pruned checkpoint holds no UNet weight, so the stored dtype never reaches a file
    assert bf16_model.prunes_checkpoints
