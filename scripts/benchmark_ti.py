"""Seconds per textual-inversion optimizer step: ours, ours without the latent cache, and a diffusers-style loop.

    python scripts/benchmark_ti.py                                   # SD-v1 architecture, random weights
    python scripts/benchmark_ti.py --precision bf16 --json out.json
    python scripts/benchmark_ti.py --config configs/tiny/finetune-tiny.yaml --size 32 --steps 2   # smoke test

All three variants run on ONE model built from --config (same architecture, same weights) in one process:

- ours: `model.shared_step(batch)`, backward, AdamW on the embedding manager's vectors. The first stage is not
  run per step: each image's posterior is cached by its `cache_key` and a fresh latent is drawn from it.
- ours_no_cache: the same with `cache_first_stage_latents` off, i.e. the VAE encoder every step, as the original.
- diffusers_style: the loop of diffusers' examples/textual_inversion/textual_inversion.py written with our
  modules: VAE encode, noise, random t, CLIP text encoder on freshly tokenised captions, UNet, MSE, backward,
  AdamW on the whole token-embedding matrix, then every row but the placeholder's restored.

Each variant reports its FLOPs per step (counted on one step with FlopCounterMode), the GFLOP/s that implies and
the fraction of the machine's own matmul throughput (measured in the same run). Speed-ups are ratios of seconds
per step, > 1 meaning ours is faster.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula,  # noqa: E402
                                      sdpa_backward_flop_count, sdpa_flop_count)

from ldm.modules.attention import BasicTransformerBlock  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

VARIANTS = ("ours", "ours_no_cache", "diffusers_style")
TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a close-up photo of a {}")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _register_cpu_attention_flops():
    """FlopCounterMode knows the CUDA attention kernels but not the one SDPA picks on CPU: count it the same way."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype, max_n, device, reps=3, budget_s=1.0):
    """Throughput of an n x n matmul: the machine's own yardstick for the steps' achieved GFLOP/s.

    n doubles from 256 up to max_n while one product is predicted to take under budget_s, so that a dtype the
    hardware lacks (bf16 on many CPUs runs at ~1 GFLOP/s) costs seconds, not minutes. Returns (GFLOP/s, n).
    """
    n = min(256, max_n)
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        seconds = (time.perf_counter() - start) / reps
        if n * 2 > max_n or seconds * 8 > budget_s:
            return 2 * n ** 3 / seconds / 1e9, n
        n *= 2


def set_gradient_checkpointing(unet, on):
    for module in unet.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = on
        if isinstance(module, BasicTransformerBlock):
            module.checkpoint = on


def build_model(config_path, device, seed):
    config = OmegaConf.load(config_path)
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model).to(device)
    model.learning_rate = config.model.get("base_learning_rate", 5e-3)
    return model.train()


def make_batch(model, size, batch_size, device, seed):
    placeholder = next(iter(model.embedding_manager.string_to_param_dict))
    g = torch.Generator().manual_seed(seed)
    return {
        "image": (torch.rand(batch_size, size, size, 3, generator=g) * 2 - 1).to(device),
        "caption": [TEMPLATES[i % len(TEMPLATES)].format(placeholder) for i in range(batch_size)],
        "cache_key": [f"image-{i}" for i in range(batch_size)],
    }


def ours_step(model, cache):
    """One step of our training loop: what LatentDiffusion.training_step and Lightning's optimizer step do."""
    optimizer = torch.optim.AdamW(model.embedding_manager.embedding_parameters(), lr=model.learning_rate)

    def step(batch, autocast):
        model.cache_first_stage_latents = cache
        with autocast():
            loss, _ = model.shared_step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@contextmanager
def trainable_token_embedding(text_encoder):
    """diffusers trains the text encoder's whole token-embedding matrix; put it back as it was afterwards."""
    weight = text_encoder.token_embedding.weight
    original = weight.detach().clone()
    weight.requires_grad_(True)
    try:
        yield weight, original
    finally:
        weight.requires_grad_(False)
        with torch.no_grad():
            weight.copy_(original)


def diffusers_style_step(model, weight, original):
    """The step of diffusers' textual_inversion.py, on our modules and weights."""
    vae, text_encoder = model.first_stage_model, model.cond_stage_model
    placeholder_id = next(iter(model.embedding_manager.string_to_token_dict.values())).item()
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[placeholder_id] = False
    optimizer = torch.optim.AdamW([weight], lr=model.learning_rate)

    def step(batch, autocast):
        pixels = batch["image"].permute(0, 3, 1, 2)
        input_ids = text_encoder.tokenize(batch["caption"])  # its dataset tokenises every item it serves
        with autocast():
            latents = vae.encode(pixels).sample().detach() * model.scale_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, model.num_timesteps, (latents.shape[0],), device=latents.device)
            noisy = model.q_sample(latents, t, noise)
            context = text_encoder.encode_tokens(input_ids)
            pred = model.apply_model(noisy, t, context)
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # only the placeholder's row may learn
            weight[keep] = original[keep]

    return step


def measure(step, batch, autocast, device, warmup, steps):
    """Warm-up (fills caches), one FLOP-counted step, then `steps` timed steps."""
    for _ in range(warmup):
        step(batch, autocast)
    with FlopCounterMode(display=False) as counter:
        step(batch, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step(batch, autocast)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"seconds_per_step": statistics.median(times), "step_times": times,
            "flops_per_step": counter.get_total_flops(), "peak_memory_mib": peak}


def run(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (512 if device.type == "cuda" else 256)
    _register_cpu_attention_flops()

    matmul, matmul_sizes = {}, {}
    for name in dict.fromkeys(("fp32", "bf16", args.precision)):
        matmul[name], matmul_sizes[name] = matmul_gflops(DTYPES[name], args.matmul_size, device)
    model = build_model(args.config, device, args.seed)
    set_gradient_checkpointing(model.model.diffusion_model, args.gradient_checkpointing == "on")
    batch = make_batch(model, size, args.batch_size, device, args.seed)
    dtype = DTYPES[args.precision]

    def autocast():
        return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    results = {
        "ours": measure(ours_step(model, cache=True), batch, autocast, device, args.warmup, args.steps),
        "ours_no_cache": measure(ours_step(model, cache=False), batch, autocast, device, args.warmup, args.steps),
    }
    with trainable_token_embedding(model.cond_stage_model) as (weight, original):
        results["diffusers_style"] = measure(diffusers_style_step(model, weight, original), batch, autocast, device,
                                             args.warmup, args.steps)
    for r in results.values():
        r["achieved_gflops"] = r["flops_per_step"] / r["seconds_per_step"] / 1e9
        r["fraction_of_matmul_peak"] = r["achieved_gflops"] / matmul[args.precision]

    ours = results["ours"]["seconds_per_step"]
    return {
        "config": str(args.config), "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "size": size,
        "batch_size": args.batch_size, "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing, "warmup": args.warmup, "steps": args.steps,
        "matmul_gflops": matmul, "matmul_sizes": matmul_sizes,
        "variants": results,
        "speedup": {"ours_vs_no_cache": results["ours_no_cache"]["seconds_per_step"] / ours,
                    "ours_vs_diffusers_style": results["diffusers_style"]["seconds_per_step"] / ours},
    }


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def format_table(report):
    lines = [f"{report['config']} at {report['size']}px, batch {report['batch_size']}, {report['precision']}, "
             f"gradient checkpointing {report['gradient_checkpointing']}, {report['device']} "
             f"({report['device_name']}), {report['threads']} threads, torch {report['torch']}",
             "matmul " + ", ".join(f"{k} {v:.1f} GFLOP/s ({report['matmul_sizes'][k]}^2)"
                                   for k, v in report["matmul_gflops"].items()),
             f"{'variant':<16} {'s/step':>9} {'GFLOP/step':>11} {'GFLOP/s':>9} {'of matmul':>10} {'peak MiB':>9}"]
    for name, r in report["variants"].items():
        peak = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/m"
        lines.append(f"{name:<16} {r['seconds_per_step']:>9.4f} {r['flops_per_step'] / 1e9:>11.2f} "
                     f"{r['achieved_gflops']:>9.1f} {r['fraction_of_matmul_peak']:>9.1%} {peak:>9}")
    s = report["speedup"]
    lines.append(f"speed-up of ours: x{s['ours_vs_no_cache']:.2f} vs no cache, "
                 f"x{s['ours_vs_diffusers_style']:.2f} vs diffusers-style loop")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/stable-diffusion/v1-finetune.yaml"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1: it fills the cache)")
    p.add_argument("--precision", choices=tuple(DTYPES), default="fp32", help="autocast dtype")
    p.add_argument("--gradient_checkpointing", choices=("on", "off"), default="off",
                   help="UNet activation checkpointing (the original's use_checkpoint: True did nothing)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--matmul_size", type=int, default=2048,
                   help="largest matmul side; smaller where one product would take over 1 s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full results here")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
