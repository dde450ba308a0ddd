import importlib.util
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.discriminator import ActNorm, NLayerDiscriminator

SD_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                   ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                     ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
IDENTITY_LOSS = {"target": "torch.nn.Identity"}


def gan_loss(disc_start):
    return {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": {"disc_start": disc_start, "perceptual_weight": 0.0, "kl_weight": 1e-6, "disc_weight": 0.5}}


def tiny_kl(lossconfig=IDENTITY_LOSS, **kwargs):
    return AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig=lossconfig, embed_dim=4, **kwargs)


def test_sd_v1_first_stage_parameter_count_and_official_keys():
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=SD_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    keys = set(model.state_dict())
    for key in ("encoder.down.0.block.0.conv1.weight", "decoder.up.3.upsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "decoder.mid.attn_1.proj_out.bias",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
                "decoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight"):
        assert key in keys, key
    assert "decoder.up.0.upsample.conv.weight" not in keys  # the highest resolution is not upsampled further
    assert "encoder.down.3.downsample.conv.weight" not in keys


def test_tiny_kl_autoencoder_shapes():
    torch.manual_seed(0)
    model = tiny_kl().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
        z = posterior.sample()
        assert model.decode(z).shape == (2, 3, 32, 32)
        rec, post = model(x, sample_posterior=False)
    assert rec.shape == x.shape and torch.equal(post.mode(), posterior.mean)
    logged = model.log_images({"image": x.permute(0, 2, 3, 1)})
    assert {k: tuple(v.shape) for k, v in logged.items()} == {
        "samples": (2, 3, 32, 32), "reconstructions": (2, 3, 32, 32), "inputs": (2, 3, 32, 32)}


def test_get_input_converts_channels_last_batches():
    model = tiny_kl()
    images = torch.rand(2, 32, 32, 3, dtype=torch.float64)
    x = model.get_input({"image": images}, "image")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[1, 2], images[1, :, :, 2].float())


def test_init_from_ckpt_restores_weights_and_ignores_keys(tmp_path):
    torch.manual_seed(0)
    source = tiny_kl()
    path = tmp_path / "ae.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    restored = tiny_kl(ckpt_path=str(path), ignore_keys=["decoder."])
    assert torch.equal(restored.encoder.conv_in.weight, source.encoder.conv_in.weight)
    assert torch.equal(restored.quant_conv.weight, source.quant_conv.weight)
    assert not torch.equal(restored.decoder.conv_in.weight, source.decoder.conv_in.weight)


def test_attn_block_matches_softmax_reference():
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        h = block.norm(x)
        b, c, hh, ww = h.shape
        q = block.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = block.k(h).reshape(b, c, hh * ww)
        v = block.v(h).reshape(b, c, hh * ww)
        weights = torch.softmax(torch.bmm(q, k) / math.sqrt(c), dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        expected = x + block.proj_out(out)
        assert torch.allclose(block(x), expected, atol=1e-5)


class RandomImages(Dataset):
    def __init__(self, n=8):
        self.images = torch.rand(n, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def test_lightning_fit_trains_autoencoder_then_discriminator():
    torch.manual_seed(0)
    model = tiny_kl(lossconfig=gan_loss(disc_start=2))
    model.learning_rate = 1e-3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(RandomImages(), batch_size=2))

    after = model.state_dict()
    assert not torch.equal(before["encoder.conv_in.weight"], after["encoder.conv_in.weight"])
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    # Batches 0 and 1 train only the autoencoder; batch 2 (disc_start) also steps the discriminator.
    assert not torch.equal(before["loss.discriminator.main.0.weight"], after["loss.discriminator.main.0.weight"])
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    for name in ("aeloss_step", "discloss_step", "train/rec_loss", "train/g_loss", "train/d_weight"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["train/disc_factor"] == 1.0
    assert metrics["train/d_weight"] > 0

    (val,) = trainer.validate(model, DataLoader(RandomImages(2), batch_size=2), verbose=False)
    assert math.isfinite(val["val/rec_loss"]) and math.isfinite(val["val/disc_loss"])


def test_kl_loss_before_disc_start_skips_discriminator_and_works_without_grad():
    torch.manual_seed(0)
    model = tiny_kl(lossconfig=gan_loss(disc_start=100)).eval()
    calls = []
    model.loss.discriminator.register_forward_hook(lambda *args: calls.append(1))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, posterior = model(x)
    loss, log = model.loss(x, rec, posterior, 0, 5, last_layer=model.get_last_layer())
    loss.backward()
    assert calls == [] and log["train/disc_factor"] == 0.0
    assert model.decoder.conv_out.weight.grad is not None
    with torch.no_grad():
        rec, posterior = model(x)
        val_loss, val_log = model.loss(x, rec, posterior, 0, 200, split="val")
        assert torch.isfinite(val_loss) and val_log["val/d_weight"] == 0.0 and calls == [1]
        d_loss, d_log = model.loss(x, rec, posterior, 1, 200, split="val")
    assert torch.isfinite(d_loss) and "val/logits_real" in d_log


def test_perceptual_weight_zero_builds_no_lpips():
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    assert not hasattr(loss, "perceptual_loss")
    assert all(not name.startswith("perceptual_loss") for name in loss.state_dict())


@pytest.mark.skipif(importlib.util.find_spec("taming") is not None, reason="taming-transformers is installed")
def test_lpips_without_taming_has_clear_error():
    with pytest.raises(ImportError, match="taming-transformers-rom1504"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)


def test_discriminator_patch_logits_and_actnorm_initialisation():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(input_nc=3, n_layers=3, use_actnorm=True)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    y = norm(x)
    assert norm.initialized.item() == 1
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(norm.reverse(y), x, atol=1e-4)


def test_hinge_loss_of_discriminator_is_zero_when_confidently_right():
    from ldm.modules.losses.vqperceptual import hinge_d_loss, vanilla_d_loss
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake) == 0
    assert hinge_d_loss(fake, real) == 3.0
    assert torch.isclose(vanilla_d_loss(real, fake), F.softplus(torch.tensor(-2.0)))


@pytest.mark.skipif(importlib.util.find_spec("taming") is not None, reason="taming-transformers is installed")
def test_vq_model_without_taming_names_the_package_to_install():
    with pytest.raises(ImportError, match="taming-transformers-rom1504"):
        VQModel(ddconfig={**TINY_DDCONFIG, "double_z": False}, lossconfig=IDENTITY_LOSS, n_embed=16, embed_dim=4)


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    stage = IdentityFirstStage(vq_interface=True)
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x
    quant, loss, info = stage.quantize(x)
    assert quant is x and loss is None and info == [None, None, None]
    assert IdentityFirstStage().quantize(x) is x


class NearestCodeQuantizer(torch.nn.Module):
    """Minimal VectorQuantizer2 (taming's interface) so that VQModel's own code can run without taming."""

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, sane_index_shape=False):
        super().__init__()
        self.embedding = torch.nn.Embedding(n_e, e_dim)
        self.beta = beta

    def forward(self, z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        indices = torch.cdist(flat, self.embedding.weight).argmin(1)
        z_q = self.embedding(indices).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        return z + (z_q - z).detach(), loss, (None, None, indices)


def test_vq_model_trains_with_ema_and_validates(monkeypatch):
    import sys
    import types
    for name in ("taming", "taming.modules", "taming.modules.vqvae"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    quantize = types.ModuleType("taming.modules.vqvae.quantize")
    quantize.VectorQuantizer2 = NearestCodeQuantizer
    monkeypatch.setitem(sys.modules, "taming.modules.vqvae.quantize", quantize)

    torch.manual_seed(0)
    lossconfig = {"target": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                  "params": {"disc_start": 1, "perceptual_weight": 0.0, "n_classes": 16}}
    model = VQModel(ddconfig={**TINY_DDCONFIG, "double_z": False}, lossconfig=lossconfig, n_embed=16,
                    embed_dim=4, use_ema=True)
    model.learning_rate = 1e-3
    before = model.quantize.embedding.weight.clone()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(RandomImages(4), batch_size=2))
    assert not torch.equal(before, model.quantize.embedding.weight)
    assert model.model_ema.num_updates.item() == 2
    assert math.isfinite(trainer.callback_metrics["train/perplexity"])
    (val,) = trainer.validate(model, DataLoader(RandomImages(2), batch_size=2), verbose=False)
    assert math.isfinite(val["val/rec_loss"]) and math.isfinite(val["val_ema/rec_loss"])
