"""Seconds per textual-inversion step and peak memory: ours against diffusers' own textual-inversion loop.

    python scripts/benchmark_ti.py                                    # SD-v1 architecture, random weights
    python scripts/benchmark_ti.py --repeats 2 --json out.json
    python scripts/benchmark_ti.py --smoke --json out.json            # tiny config, seconds (the test's mode)

Both loops run the SAME weights: ours are built from --config with a fixed seed, and the peer's modules are
diffusers' own `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`, filled from our
state dict by diffusers' own converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`).

- ours: `LatentDiffusion.shared_step(batch)` (posterior cached per image, tokens cached), backward, AdamW on the
  embedding manager's vectors: what our training_step and Lightning's optimizer step do. bf16 is autocast with the
  frozen UNet's convs and linears stored in bf16, as `main.py --precision bf16-mixed` does (on_fit_start).
- diffusers: the step of diffusers' examples/textual_inversion/textual_inversion.py: tokenise the caption (its
  dataset does so per item), VAE encode, `latent_dist.sample() * scaling_factor`, noise, random t,
  `DDPMScheduler.add_noise`, CLIP text encoder, UNet, MSE, backward, AdamW on the whole token-embedding matrix,
  then every row but the placeholder's restored. With bf16 the frozen UNet and VAE are cast to bf16 and the step
  runs under autocast, as that script does under accelerate.

Every case (loop x precision x gradient checkpointing) runs in its own child process, so its peak memory is its
own: CPU peak RSS while stepping (the kernel's high-water mark, reset once the models are built, so that
building the peer from our weights does not count against it), CUDA `max_memory_allocated`. Cases alternate and
repeat (--repeats); ratios are of medians from the same run. > 1 means ours is faster; RSS ratios are ours/theirs.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula,  # noqa: E402
                                      sdpa_backward_flop_count, sdpa_flop_count)

from benchmark_common import (DTYPES, ROOT, SD_CONFIG, SMOKE_CONFIG, build_model,  # noqa: E402,F401 (the tests')
                              device_name, diffusers_modules, load_config, peak_memory_mib, process_peak_rss_mib,
                              reset_peak_memory, synchronize)

LOOPS = ("ours", "diffusers")
TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a close-up photo of a {}")
# (loop, precision, gradient checkpointing): the cases whose ratios the issue asks for
CASES = (("ours", "fp32", "off"), ("diffusers", "fp32", "off"), ("ours", "bf16", "off"), ("diffusers", "bf16", "off"),
         ("ours", "fp32", "on"))


# --- the peer's step: diffusers' textual_inversion.py on its own modules ----------------------------------------

def diffusers_step(model, config, precision, gradient_checkpointing, device):
    """The training step of diffusers' textual_inversion.py on its own modules (`step.embedding`: what it trains)."""
    from diffusers import DDPMScheduler
    unet, vae, text_encoder = diffusers_modules(model, config)
    tokenizer = model.cond_stage_model.tokenizer
    placeholder_id = next(iter(model.embedding_manager.string_to_token_dict.values())).item()
    p = config.model.params
    scheduler = DDPMScheduler(num_train_timesteps=p.timesteps, beta_start=p.linear_start, beta_end=p.linear_end,
                              beta_schedule="scaled_linear")
    unet, vae, text_encoder = unet.to(device), vae.to(device), text_encoder.to(device)
    weight_dtype = DTYPES[precision]
    if precision != "fp32":  # the script keeps the frozen UNet and VAE in the mixed-precision dtype
        unet.to(dtype=weight_dtype)
        vae.to(dtype=weight_dtype)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    embedding = text_encoder.get_input_embeddings().weight
    embedding.requires_grad_(True)
    if gradient_checkpointing == "on":
        unet.train()
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    text_encoder.train()
    original = embedding.detach().clone()
    keep = torch.ones(embedding.shape[0], dtype=torch.bool, device=device)
    keep[placeholder_id] = False
    optimizer = torch.optim.AdamW([embedding], lr=config.model.base_learning_rate)
    scaling = vae.config.scaling_factor

    def step(batch, autocast):
        input_ids = tokenizer(batch["caption"], padding="max_length", truncation=True,
                              max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        pixels = batch["image"].permute(0, 3, 1, 2).to(weight_dtype)
        with autocast():
            latents = vae.encode(pixels).latent_dist.sample().detach() * scaling
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
            noisy = scheduler.add_noise(latents, noise, t)
            hidden = text_encoder(input_ids)[0].to(dtype=weight_dtype)
            pred = unet(noisy, t, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            embedding[keep] = original[keep]

    step.embedding = embedding
    return step


# --- ours -------------------------------------------------------------------------------------------------------

def set_gradient_checkpointing(unet, on):
    """The UNet config's `use_checkpoint`, switched on every block after construction."""
    for module in unet.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = on
        if hasattr(module, "checkpoint") and isinstance(getattr(module, "checkpoint"), bool):
            module.checkpoint = on


def ours_step(model, config, precision, gradient_checkpointing, device):
    set_gradient_checkpointing(model.model.diffusion_model, gradient_checkpointing == "on")
    if precision != "fp32":  # what LatentDiffusion.on_fit_start does under --precision bf16-mixed / 16-mixed
        model.match_frozen_unet_to_precision({"bf16": "bf16-mixed", "fp16": "16-mixed"}[precision])
    optimizer = torch.optim.AdamW(model.embedding_manager.embedding_parameters(), lr=config.model.base_learning_rate)

    def step(batch, autocast):
        with autocast():
            loss, _ = model.shared_step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- measuring one case (child process) -------------------------------------------------------------------------

def register_cpu_attention_flops():
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


def make_batch(model, size, batch_size, device, seed):
    placeholder = next(iter(model.embedding_manager.string_to_param_dict))
    g = torch.Generator().manual_seed(seed)
    return {
        "image": (torch.rand(batch_size, size, size, 3, generator=g) * 2 - 1).to(device),
        "caption": [TEMPLATES[i % len(TEMPLATES)].format(placeholder) for i in range(batch_size)],
        "cache_key": [f"image-{i}" for i in range(batch_size)],
    }


def measure_case(args, loop, precision, gradient_checkpointing):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_cpu_attention_flops()
    config = load_config(args)
    start = time.perf_counter()
    model = build_model(config, device, args.seed)
    batch = make_batch(model, args.size, args.batch_size, device, args.seed)
    make = ours_step if loop == "ours" else diffusers_step
    step = make(model, config, precision, gradient_checkpointing, device)
    if loop == "diffusers":
        # our LatentDiffusion stays referenced by the closure only through the tokenizer and ids it lent
        model.model = model.first_stage_model = None
    build_seconds = time.perf_counter() - start
    dtype = DTYPES[precision]

    def autocast():
        return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    reset_worked = reset_peak_memory(device)
    for i in range(args.warmup):  # the first fills our caches; the last warm-up step is FLOP-counted
        if i == args.warmup - 1:
            with FlopCounterMode(display=False) as counter:
                step(batch, autocast)
        else:
            step(batch, autocast)
    times = []
    for _ in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        step(batch, autocast)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"loop": loop, "precision": precision, "gradient_checkpointing": gradient_checkpointing,
            "seconds_per_step": statistics.median(times), "step_times": times,
            "flops_per_step": counter.get_total_flops(), "build_seconds": build_seconds,
            "peak_memory_mib": peak_memory_mib(device, reset_worked), "process_peak_rss_mib": process_peak_rss_mib(),
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS while stepping"}


# --- orchestration (parent process) -----------------------------------------------------------------------------

def matmul_gflops(dtype, max_n, device, reps=3, budget_s=1.0):
    """Throughput of an n x n matmul, the machine's own yardstick; n doubles from 256 while a product is cheap."""
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
            return 2 * n ** 3 / seconds / 1e9
        n *= 2


def child_command(args, case, out_path):
    loop, precision, ckpt = case
    return [sys.executable, os.path.abspath(__file__), "--child", f"{loop},{precision},{ckpt}", "--child_out", out_path,
            "--config", args.config, "--device", args.device, "--size", str(args.size),
            "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else []) + (
        ["--smoke"] if args.smoke else [])


def run_case(args, case, workdir, rep):
    out_path = os.path.join(workdir, f"{'-'.join(case)}-{rep}.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(child_command(args, case, out_path), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out_path) as f:
        return json.load(f)


def summarise(cases, runs):
    """Median s/step and peak memory per case over the repeats, then the ratios the issue asks for."""
    summary = {}
    for case in cases:
        rs = runs["-".join(case)]
        summary["-".join(case)] = {
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
            "peak_memory_mib": statistics.median(r["peak_memory_mib"] for r in rs),
            "flops_per_step": rs[0]["flops_per_step"], "runs": len(rs)}

    def s(loop, prec, ckpt="off"):
        return summary.get(f"{loop}-{prec}-{ckpt}")

    ratios = {}
    for prec in ("fp32", "bf16", "fp16"):
        ours, theirs = s("ours", prec), s("diffusers", prec)
        if ours and theirs:
            ratios[f"train_speedup_{prec}"] = theirs["seconds_per_step"] / ours["seconds_per_step"]
            ratios[f"peak_memory_ratio_{prec}"] = ours["peak_memory_mib"] / theirs["peak_memory_mib"]
    for prec in ("fp32", "bf16", "fp16"):
        on, off = s("ours", prec, "on"), s("ours", prec)
        if on and off:
            ratios[f"checkpointing_time_cost_{prec}"] = on["seconds_per_step"] / off["seconds_per_step"]
            ratios[f"checkpointing_memory_ratio_{prec}"] = on["peak_memory_mib"] / off["peak_memory_mib"]
    return summary, ratios


TARGETS = {"train_speedup_fp32": (">=", 1.5), "train_speedup_bf16": (">=", 1.5),
           "peak_memory_ratio_fp32": ("<=", 0.8), "peak_memory_ratio_bf16": ("<=", 0.8)}


def format_report(report):
    lines = [f"{report['config']} at {report['size']}px, batch {report['batch_size']}, {report['device']} "
             f"({report['device_name']}), {report['threads']} threads, torch {report['torch']}, "
             f"{report['repeats']} alternated repeat(s), {report['steps']} timed step(s) per case",
             "matmul " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in report["matmul_gflops"].items()),
             f"{'case':<22} {'s/step':>8} {'GFLOP/step':>11} {'GFLOP/s':>8} {'peak MiB':>9}"]
    for name, r in report["cases"].items():
        lines.append(f"{name:<22} {r['seconds_per_step']:>8.3f} {r['flops_per_step'] / 1e9:>11.1f} "
                     f"{r['flops_per_step'] / 1e9 / r['seconds_per_step']:>8.1f} {r['peak_memory_mib']:>9.0f}")
    for name, value in report["ratios"].items():
        target = TARGETS.get(name)
        verdict = ""
        if target:
            met = value >= target[1] if target[0] == ">=" else value <= target[1]
            verdict = f"   target {target[0]} {target[1]}: {'met' if met else 'NOT met'}"
        lines.append(f"{name:<32} {value:6.2f}{verdict}")
    return "\n".join(lines)


def run(args):
    import tempfile
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [tuple(c.split(",")) for c in args.cases]
    matmul = {p: matmul_gflops(DTYPES[p], args.matmul_size, device)
              for p in dict.fromkeys(["fp32"] + [c[1] for c in cases])}
    runs = {"-".join(c): [] for c in cases}
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.repeats):
            order = cases if rep % 2 == 0 else cases[::-1]  # alternate, and reverse every other round
            for case in order:
                result = run_case(args, case, workdir, rep)
                runs["-".join(case)].append(result)
                print(f"[{rep}] {'-'.join(case)}: {result['seconds_per_step']:.3f} s/step, "
                      f"{result['peak_memory_mib']:.0f} MiB", flush=True)
    summary, ratios = summarise(cases, runs)
    return {"config": os.path.relpath(args.config, ROOT), "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(), "size": args.size,
            "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "matmul_gflops": matmul, "cases": summary, "ratios": ratios, "runs": runs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"model config (default {os.path.relpath(SD_CONFIG, ROOT)})")
    p.add_argument("--smoke", action="store_true", help="tiny config, 32 px, 1 step, 1 thread: seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 2: fill caches, count FLOPs)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all cases, alternating their order")
    p.add_argument("--cases", nargs="+", default=[",".join(c) for c in CASES],
                   help="loop,precision,checkpointing triples, e.g. ours,bf16,on diffusers,fp32,on")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--matmul_size", type=int, default=2048, help="largest matmul side for the yardstick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.config = args.config or SMOKE_CONFIG
        args.size = args.size or 32
        args.steps, args.threads, args.matmul_size = 1, args.threads or 1, 256
    args.config = os.path.abspath(args.config or SD_CONFIG)
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    if args.warmup < 2 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup must be at least 2, --steps and --repeats at least 1")
    for case in args.cases:
        parts = case.split(",")
        if len(parts) != 3 or parts[0] not in LOOPS or parts[1] not in DTYPES or parts[2] not in ("on", "off"):
            p.error(f"--cases: {case!r} is not loop,precision,checkpointing (e.g. ours,fp32,off)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        result = measure_case(args, *args.child.split(","))
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return result
    report = run(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = [k for k, v in report["ratios"].items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SystemExit(f"benchmark_ti: ratios not positive and finite: {bad}")
    return report


if __name__ == "__main__":
    main()
