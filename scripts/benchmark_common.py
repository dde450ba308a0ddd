"""What the benchmark scripts share (benchmark_ti.py, benchmark_sampling.py): the configs they run, building our
model at random weights, the peer's modules on the same weights, and peak-memory and device bookkeeping."""
import gc
import os
import platform
import resource
import sys

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_CONFIG = os.path.join(ROOT, "configs/stable-diffusion/v1-finetune.yaml")
SMOKE_CONFIG = os.path.join(ROOT, "configs/tiny/finetune-tiny.yaml")
# diffusers' converter reads SD v1's head rule (a head count, not a head width)
SMOKE_OVERRIDES = ["model.params.unet_config.params.num_heads=2", "model.params.unet_config.params.num_head_channels=-1"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- the peer: diffusers' and transformers' own modules on our weights ------------------------------------------
def diffusers_modules(model, config):
    """(unet, vae, text_encoder) of diffusers/transformers holding `model`'s weights, converted by diffusers.

    Built on the meta device and loaded with assign=True: the peer shares our tensors instead of copying them, so
    building it costs neither a second random initialisation nor a second copy of the weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextModel

    checkpoint = model.state_dict()
    original = OmegaConf.to_container(config, resolve=True)
    size = config.model.params.unet_config.params.image_size * 2 ** (
        len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)
    unet_config = su.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=size)
    vae_config = su.create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=size)
    clip = model.cond_stage_model.transformer
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(clip.config)
    unet.load_state_dict(su.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True, assign=True)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True, assign=True)
    clip_state = su.convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text_encoder, "text_model"):  # transformers 5.x flattened CLIPTextModel
        clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    clip_state = {k: v for k, v in clip_state.items() if not k.endswith("position_ids")}
    text_encoder.load_state_dict(clip_state, strict=False, assign=True)
    for name, buffer in text_encoder.named_buffers():  # non-persistent buffers are not in a state dict
        if buffer.is_meta:
            owner, attr = text_encoder.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(owner, attr, dict(clip.named_buffers())[name].clone())
    return unet, vae, text_encoder


def build_model(config, device, seed):
    """Our model at random weights; the UNet's zero-initialised output convs get small random weights too, so that
    the prediction (and the gradient reaching the embedding) is not identically zero."""
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model).to(device)
    with torch.no_grad():
        for p in model.model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return model.train()


def load_config(args):
    config = OmegaConf.load(args.config)
    if args.smoke:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(SMOKE_OVERRIDES))
    return config


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    """Start a fresh high-water mark: CUDA's allocator statistics, or the kernel's VmHWM of this process."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(device, reset_worked):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return process_peak_rss_mib()


def process_peak_rss_mib():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
