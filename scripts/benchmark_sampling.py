"""Seconds per DDIM step with classifier-free guidance: ours (DDIMSampler) against diffusers' own pipeline loop.

    python scripts/benchmark_sampling.py                       # SD-v1 architecture, random weights, 256 px
    python scripts/benchmark_sampling.py --smoke --json out.json

Same weights on both sides (diffusers' UNet2DConditionModel and transformers' CLIPTextModel filled from our state
dict by diffusers' converters, as in benchmark_ti.py), same start latents, same number of steps, eta 0, guidance
7.5. Ours: `DDIMSampler.sample(..., unconditional_guidance_scale=7.5, unconditional_conditioning=uc)`. Theirs:
the denoising loop of StableDiffusionPipeline with `DDIMScheduler` configured as Stable Diffusion ships it
(scaled_linear betas, steps_offset 1, set_alpha_to_one False): cond and uncond batched through one UNet call,
`scheduler.step`. Prompts are encoded before the clock starts and the latents are not decoded, on both sides.
Each loop runs in its own process (peak memory its own), loops alternate over --repeats, and the final latents
of the two are compared (they follow the same trajectory up to float rounding).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout

import torch  # noqa: E402

import benchmark_common as bc  # noqa: E402

LOOPS = ("ours", "diffusers", "ours_compiled")  # the last only with --compile
TARGETS = {"fp32": 1.1, "bf16": 1.0, "fp16": 1.0}  # issue 18: per-step speed-up over diffusers


def ours_sampler(model, config, device, prompt, batch_size, precision):
    from ldm.models.diffusion.ddim import DDIMSampler
    model.eval()
    sampler = DDIMSampler(model)
    dtype = bc.DTYPES[precision]
    if precision != "fp32":
        model.model.diffusion_model.convert_torso(dtype, norms=dtype == torch.bfloat16)  # as txt2img.py does
    with torch.no_grad():
        c = model.get_learned_conditioning([prompt] * batch_size)
        uc = model.get_learned_conditioning([""] * batch_size)

    def sample(x_T, steps, guidance):
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            out, _ = sampler.sample(S=steps, batch_size=batch_size, shape=tuple(x_T.shape[1:]), conditioning=c,
                                    unconditional_guidance_scale=guidance, unconditional_conditioning=uc, eta=0.,
                                    x_T=x_T, verbose=False)
        return out

    return sample


def diffusers_sampler(model, config, device, prompt, batch_size, precision):
    from diffusers import DDIMScheduler
    unet, vae, text_encoder = bc.diffusers_modules(model, config)
    dtype = bc.DTYPES[precision]  # a pipeline loaded with torch_dtype runs its modules in that dtype
    unet, text_encoder = unet.to(device, dtype).eval(), text_encoder.to(device, dtype).eval()
    vae = vae.to(device, dtype)  # not run in the loop, but a pipeline holds it, as our model holds its first stage
    tokenizer = model.cond_stage_model.tokenizer
    p = config.model.params
    scheduler = DDIMScheduler(num_train_timesteps=p.timesteps, beta_start=p.linear_start, beta_end=p.linear_end,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)

    def encode(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0]

    with torch.no_grad():
        prompt_embeds = torch.cat([encode([""] * batch_size), encode([prompt] * batch_size)])

    @torch.no_grad()
    def sample(x_T, steps, guidance):
        scheduler.set_timesteps(steps, device=device)
        latents = x_T.to(dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        return latents

    sample.vae = vae
    return sample


def measure_loop(args, loop):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bc.load_config(args)
    model = bc.build_model(config, device, args.seed)
    make = diffusers_sampler if loop == "diffusers" else ours_sampler
    sample = make(model, config, device, args.prompt, args.batch_size, args.precision)
    if loop == "ours_compiled":
        model.compile_unet()
    if loop == "diffusers":
        model.model = model.first_stage_model = None
    p = config.model.params
    latent = args.size // 2 ** (len(p.first_stage_config.params.ddconfig.ch_mult) - 1)
    x_T = torch.randn(args.batch_size, p.channels, latent, latent, generator=torch.Generator().manual_seed(args.seed))
    x_T = x_T.to(device)
    reset_worked = bc.reset_peak_memory(device)
    start = time.perf_counter()
    sample(x_T, 2, args.guidance)  # warm-up (the compiling, for ours_compiled)
    bc.synchronize(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    out = sample(x_T, args.steps, args.guidance)
    bc.synchronize(device)
    seconds = time.perf_counter() - start
    if args.profile:  # one more step, profiled: where its time goes, op by op (after the timing, so it costs none)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sample(x_T, 1, args.guidance)
        print(f"{loop}, one DDIM step:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
              file=sys.stderr)
    return {"loop": loop, "seconds_per_step": seconds / args.steps, "seconds": seconds, "warmup_seconds": warmup,
            "peak_memory_mib": bc.peak_memory_mib(device, reset_worked)}, out.float().cpu()


def run(args):
    cases = list(LOOPS if args.compile else LOOPS[:2])
    runs = {loop: [] for loop in cases}
    finals = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [bc.ROOT, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.repeats):
            for loop in (cases if rep % 2 == 0 else cases[::-1]):
                out = os.path.join(workdir, f"{loop}-{rep}")
                cmd = [sys.executable, os.path.abspath(__file__), "--child", loop, "--child_out", out,
                       "--config", args.config, "--device", args.device, "--size", str(args.size),
                       "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--seed", str(args.seed),
                       "--guidance", str(args.guidance), "--prompt", args.prompt, "--precision", args.precision]
                cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--smoke"] if args.smoke else [])
                cmd += ["--profile"] if args.profile else []
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"sampling case {loop} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                if args.profile:
                    print(proc.stderr[proc.stderr.index(f"{loop}, one DDIM step:"):], flush=True)
                with open(out + ".json") as f:
                    runs[loop].append(json.load(f))
                finals[loop] = torch.load(out + ".pt")
                print(f"[{rep}] {loop}: {runs[loop][-1]['seconds_per_step']:.3f} s/step, "
                      f"{runs[loop][-1]['peak_memory_mib']:.0f} MiB", flush=True)
    summary = {loop: {key: statistics.median(r[key] for r in rs)
                      for key in ("seconds_per_step", "warmup_seconds", "peak_memory_mib")}
               for loop, rs in runs.items()}
    ratios = {"sampling_speedup": summary["diffusers"]["seconds_per_step"] / summary["ours"]["seconds_per_step"],
              "sampling_peak_memory_ratio": summary["ours"]["peak_memory_mib"] / summary["diffusers"]["peak_memory_mib"]}
    if "ours_compiled" in summary:
        eager, compiled = summary["ours"], summary["ours_compiled"]
        ratios["compiled_speedup"] = eager["seconds_per_step"] / compiled["seconds_per_step"]
        saved = eager["seconds_per_step"] - compiled["seconds_per_step"]
        # steps after which compiling has paid for itself (inf: it never does)
        ratios["compile_break_even_steps"] = (compiled["warmup_seconds"] - eager["warmup_seconds"]) / saved \
            if saved > 0 else math.inf
    return {"config": os.path.relpath(args.config, bc.ROOT), "device": args.device,
            "device_name": bc.device_name(torch.device(args.device)), "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(), "size": args.size, "batch_size": args.batch_size,
            "steps": args.steps, "guidance": args.guidance, "precision": args.precision, "repeats": args.repeats, "loops": summary,
            "ratios": ratios, "max_abs_diff_final_latents": (finals["ours"] - finals["diffusers"]).abs().max().item(),
            "max_abs_diff_compiled": (finals["ours"] - finals["ours_compiled"]).abs().max().item()
            if "ours_compiled" in finals else None,
            "runs": runs}


def format_report(report):
    lines = [f"DDIM {report['steps']} steps, guidance {report['guidance']}, {report['precision']}, {report['config']} at {report['size']}px, "
             f"batch {report['batch_size']}, {report['device']} ({report['device_name']}), {report['threads']} "
             f"threads, torch {report['torch']}, {report['repeats']} alternated repeat(s)"]
    for loop, r in report["loops"].items():
        lines.append(f"{loop:<14} {r['seconds_per_step']:>8.3f} s/step {r['peak_memory_mib']:>8.0f} MiB  "
                     f"(warm-up of 2 steps {r['warmup_seconds']:.1f} s)")
    target = TARGETS[report["precision"]]
    verdict = "met" if report["ratios"]["sampling_speedup"] >= target else "NOT met"
    lines.append(f"sampling_speedup {report['ratios']['sampling_speedup']:.2f} (target >= {target}: {verdict}); "
                 f"peak memory ours/theirs {report['ratios']['sampling_peak_memory_ratio']:.2f}; "
                 f"final latents differ by at most {report['max_abs_diff_final_latents']:.2e}")
    if "compiled_speedup" in report["ratios"]:
        lines.append(f"compiled/eager: x{report['ratios']['compiled_speedup']:.2f} per step, compiling pays after "
                     f"{report['ratios']['compile_break_even_steps']:.0f} steps; final latents differ by "
                     f"{report['max_abs_diff_compiled']:.2e}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="model config (default configs/stable-diffusion/v1-finetune.yaml)")
    p.add_argument("--smoke", action="store_true", help="tiny config, 32 px, 3 steps, 1 thread: seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps timed")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="ours: autocast with the UNet torso stored in it; diffusers: its modules cast to it")
    p.add_argument("--prompt", default="a photo of a cat on the beach",
                   help="no placeholder, so that both loops condition on the same words")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time our sampler with the UNet torch.compiled")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one more step per loop")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=LOOPS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.config = args.config or bc.SMOKE_CONFIG
        args.size = args.size or 32
        args.steps, args.threads = 3, args.threads or 1
    args.config = os.path.abspath(args.config or bc.SD_CONFIG)
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        result, final = measure_loop(args, args.child)
        with open(args.child_out + ".json", "w") as f:
            json.dump(result, f)
        torch.save(final, args.child_out + ".pt")
        return result
    report = run(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = [k for k, v in report["ratios"].items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SystemExit(f"benchmark_sampling: ratios not positive and finite: {bad}")
    return report


if __name__ == "__main__":
    main()
