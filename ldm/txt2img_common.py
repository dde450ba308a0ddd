"""Everything scripts/txt2img.py and scripts/stable_txt2img.py share: flags, model loading, sampling, saving.

The two scripts differ only in their defaults (LDM-1.4B at 256 px vs Stable Diffusion v1 at 512 px).
"""
import argparse
import os
import re
import time
import warnings
from contextlib import nullcontext
from itertools import islice

import torch
from pytorch_lightning import seed_everything
from tqdm import tqdm, trange

from ldm.checkpoint import load_model_from_config
from ldm.config_trust import load_trusted_config
from ldm.models.diffusion.generate import SAMPLERS, generate
from ldm.models.diffusion.textual_inversion import EmbeddingLoadError, load_embeddings
from ldm.util import InputFileError, make_grid, read_text_file, to_pil

MAX_PROMPT_FILE_BYTES = 16 * 2**20  # far more prompts than anyone samples; bounds what a wrong path can cost


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def build_parser(description, **defaults):
    """The original scripts' flags; `defaults` overrides per script (config, ckpt, H, W, ddim_steps, ...)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples (speed measurements)")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (the same as --sampler plms)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="the sampling method (see docs/samplers.md); --ddim_steps sets its number of steps")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting code for every batch")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (0.0 is deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    p.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=3, help="how many samples per prompt, a.k.a. batch size")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=7.5,
                   help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="what the image should not show: guidance steers away from it instead of from the empty "
                        "prompt; loaded embeddings work here by their word (e.g. EasyNegative)")
    p.add_argument("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml",
                   help="path to the config which constructs the model")
    p.add_argument("--trust_config", action="store_true",
                   help="allow --config to name targets outside this project's modules (configs are code)")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="path to the model checkpoint (.ckpt, .pt or .safetensors)")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                   help="evaluate at this precision (autocast: float16 on GPUs, bfloat16 on CPU)")
    p.add_argument("--embedding_path", type=str, nargs="+",
                   help="learned embedding file(s): official embeddings.pt, AUTOMATIC1111, diffusers or kohya")
    p.add_argument("--placeholder_string", type=str, nargs="+",
                   help="use these placeholder strings for the loaded embeddings (one per embedding file)")
    p.add_argument("--device", type=str, default=default_device(), help="cuda, mps or cpu (default: best available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: its first steps compile, later ones run faster (pays off over "
                        "many steps or images; see docs/benchmarks.md)")
    p.set_defaults(**defaults)
    return p


def check_inputs(opt):
    """Fail early, naming the missing file and how to get it, before minutes of model loading."""
    if not os.path.isfile(opt.config):
        raise SystemExit(f"Config not found: {opt.config}. Pass --config PATH to the model's YAML config.")
    if not os.path.isfile(opt.ckpt):
        raise SystemExit(f"Checkpoint not found: {opt.ckpt}. Download the model weights to that path "
                         "(see README.md) or pass --ckpt PATH.")
    for path in opt.embedding_path or []:
        if not os.path.isfile(path):
            raise SystemExit(f"Embedding file not found: {path}. Pass --embedding_path with the embeddings.pt "
                             "written by main.py (in the run's checkpoints folder) or another embedding file.")
    if os.path.exists(opt.outdir) and not os.path.isdir(opt.outdir):
        raise SystemExit(f"--outdir {opt.outdir} is a file, not a folder: give a folder for the samples.")
    device_type = torch.device(opt.device).type
    if (device_type == "cuda" and not torch.cuda.is_available()) or (
            device_type == "mps" and not torch.backends.mps.is_available()):
        raise SystemExit(f"--device {opt.device} is not available on this machine; try --device cpu.")
    if opt.plms and opt.sampler not in ("ddim", "plms"):
        raise SystemExit(f"--plms and --sampler {opt.sampler} disagree: pass one of them.")
    if opt.plms:
        opt.sampler = "plms"
    if opt.ddim_eta != 0 and opt.sampler != "ddim":
        raise SystemExit(f"--ddim_eta applies to DDIM only: drop it or sample with --sampler ddim "
                         f"(not {opt.sampler}).")


def load_model(opt):
    model = load_model_from_config(load_trusted_config(opt.config, opt.trust_config), opt.ckpt, device=opt.device,
                                   verbose=False)
    unet = model.model.diffusion_model
    dtype = autocast_dtype(opt)
    if dtype is not None and hasattr(unet, "convert_torso"):
        # stored in the autocast dtype, the frozen UNet is not re-cast weight by weight at every sampling step;
        # in bf16 (float32's range) its norms too, as diffusers runs it; fp16 keeps float32 norms for stability
        unet.convert_torso(dtype, norms=dtype == torch.bfloat16)
    if opt.compile:
        model.compile_unet()
    if opt.embedding_path:
        try:
            load_embeddings(model, opt.embedding_path, opt.placeholder_string, opt.config)
        except EmbeddingLoadError as err:
            raise SystemExit(str(err)) from err
    return model


def read_prompts(path):
    """The non-blank lines of a UTF-8 prompt file; InputFileError naming the file when it is not one."""
    text = read_text_file(path, "prompt file", MAX_PROMPT_FILE_BYTES)
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputFileError(f"prompt file {path} holds no prompt: write one prompt per line")
    return prompts


def prompt_batches(opt):
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    print(f"reading prompts from {opt.from_file}")
    lines = iter(read_prompts(opt.from_file))
    return list(iter(lambda: list(islice(lines, opt.n_samples)), []))


def next_index(folder, pattern):
    """One past the largest number in the file names matching `pattern`: never overwrites earlier runs."""
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := re.fullmatch(pattern, name))]
    return max(numbers, default=-1) + 1


def prompt_to_filename(prompt, default):
    """A file or folder name for a prompt: only characters every file system accepts ("*" is not one of
    them on Windows), at most 100; `default` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", prompt).strip("-")[:100] or default


def warn_lost_placeholders(model, prompts):
    """Warn when a prompt writes a concept that its tokenization hides (e.g. '*,' is one CLIP token)."""
    manager = getattr(model, "embedding_manager", None)  # None: the config has no personalization_config
    if manager is None:
        return
    for prompt in sorted(prompts):
        for name in manager.names_lost_in(prompt):
            warnings.warn(f"In the prompt {prompt!r}, {name!r} merges with the characters next to it into another "
                          f"token, so the learned concept is not used there: put spaces around {name!r}.")


def warn_cut_prompts(model, prompts):
    """One line for each prompt longer than the text encoder reads, saying how many tokens are cut (the
    tokenizer truncates silently; its own warning about indexing errors does not apply to us)."""
    manager = getattr(model, "embedding_manager", None)
    managers = list(manager.managers.values()) if hasattr(manager, "managers") else [manager]
    for prompt in sorted(prompts):
        for one in managers:
            positions = one.prompt_positions(prompt) if hasattr(one, "prompt_positions") else 0
            if positions > one.max_length:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"The prompt {shown!r} is {positions - 2} tokens long; the text encoder reads "
                              f"{one.max_length - 2}, so the last {positions - one.max_length} are cut.")
                break


def autocast_dtype(opt):
    """bfloat16 on CPUs, float16 on GPUs; None without --precision autocast."""
    if opt.precision != "autocast":
        return None
    return torch.bfloat16 if torch.device(opt.device).type == "cpu" else torch.float16


def precision_scope(opt):
    dtype = autocast_dtype(opt)
    return nullcontext() if dtype is None else torch.autocast(torch.device(opt.device).type, dtype=dtype)


def main(parser, argv=None):
    """Parse `argv` with `parser`, sample, write outdir/samples/NNNNN.png and a grid; returns the paths written."""
    opt = parser.parse_args(argv)
    check_inputs(opt)
    batches = prompt_batches(opt)  # a bad prompt file is reported before the model loads
    seed_everything(opt.seed, verbose=False)
    model = load_model(opt)
    # A CPU generator: the same seed gives the same images on CPU, CUDA and MPS.
    generator = torch.Generator().manual_seed(opt.seed)

    sample_path = os.path.join(opt.outdir, "samples")
    os.makedirs(sample_path, exist_ok=True)
    base_count = next_index(sample_path, r"(\d+)\.png")
    shape = [opt.C, opt.H // opt.f, opt.W // opt.f]
    start_code = None
    if opt.fixed_code:
        start_code = torch.randn([opt.n_samples, *shape], generator=generator).to(opt.device)

    all_prompts = {prompt for prompts in batches for prompt in prompts} | {opt.negative_prompt}
    warn_lost_placeholders(model, all_prompts)
    warn_cut_prompts(model, all_prompts)
    written, all_samples = [], []
    tic = time.time()
    with torch.no_grad(), precision_scope(opt), model.ema_scope():
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                images = generate(model, prompts, opt.sampler, opt.ddim_steps, opt.scale, opt.ddim_eta, generator,
                                  shape, x_T=None if start_code is None else start_code[:len(prompts)],
                                  negative_prompt=opt.negative_prompt).cpu()
                if not opt.skip_save:
                    for image in images:
                        path = os.path.join(sample_path, f"{base_count:05}.png")
                        to_pil(image).save(path)
                        written.append(path)
                        base_count += 1
                if not opt.skip_grid:
                    all_samples.append(images)

    if not opt.skip_grid:
        grid = make_grid(torch.cat(all_samples), nrow=opt.n_rows or opt.n_samples, pad_value=-1.)
        name = "grid" if opt.from_file else prompt_to_filename(opt.prompt, "grid")
        index = next_index(opt.outdir, re.escape(name) + r"-(\d{4})\.png")
        path = os.path.join(opt.outdir, f"{name}-{index:04}.png")
        to_pil(grid).save(path)
        written.append(path)

    print(f"Sampled in {time.time() - tic:.1f} s. Your samples are ready and waiting for you here:\n{opt.outdir}\nEnjoy.")
    return written
