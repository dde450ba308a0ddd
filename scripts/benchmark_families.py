"""Seconds per textual-inversion step and peak memory of the full-size SD 2.x (v) and SDXL models on the CPU.

    nice python scripts/benchmark_families.py --family sd2           # v2-finetune-v.yaml at 768 px
    nice python scripts/benchmark_families.py --family sdxl          # sd_xl_base-finetune.yaml at 1024 px
    nice python scripts/benchmark_families.py --family sdxl --size 512 --steps 2

Random weights (nothing is downloaded). The model is built directly in bf16 (the default dtype while its
modules are made, so no fp32 copy ever exists; the schedule, the norms and the learned vectors are then made
fp32, the UNet's torso stored in bf16 as convert_torso does),
then each step is what main.py --precision bf16-mixed does (which, unlike here, keeps the text encoders and the
autoencoder in fp32): `shared_step` under bf16 autocast (the frozen
first stage's posterior cached per image after the warm-up step, as in training), backward, AdamW on the
embedding manager's vectors. Batch 1 at the family's native size (--size overrides); the configs' own gradient
checkpointing (`use_checkpoint: true`) is kept. Prints s/step (wall clock and the process's CPU time, which a
shared machine inflates less; medians of --steps after --warmup) and the peak RSS of the process (VmHWM) after
building and after stepping.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.util import instantiate_from_config  # noqa: E402

FAMILIES = {
    "sd2": ("configs/stable-diffusion/v2-finetune-v.yaml", 768),
    "sdxl": ("configs/stable-diffusion-xl/sd_xl_base-finetune.yaml", 1024),
}


def peak_rss_gib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def build(config_path):
    config = OmegaConf.load(os.path.join(ROOT, config_path))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = instantiate_from_config(config.model)
    finally:
        torch.set_default_dtype(default)
    for name, buffer in model.named_buffers(recurse=False):  # the schedule in fp32, as the configs build it
        setattr(model, name, buffer.float())
    for module in model.modules():  # norms in fp32, as convert_torso keeps them (they are small)
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            module.float()
    model.model.diffusion_model.convert_torso(torch.bfloat16)
    for param in model.embedding_manager.embedding_parameters():
        param.data = param.data.float()
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--size", type=int, help="image size in pixels (default: the family's native size)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    opt = parser.parse_args(argv)
    torch.set_num_threads(opt.threads)
    config_path, native = FAMILIES[opt.family]
    size = opt.size or native
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(config_path)
    built_s, built_rss = time.perf_counter() - start, peak_rss_gib()
    model.image_size = size // model.latent_factor
    model.train()
    optimizer = torch.optim.AdamW(list(model.embedding_manager.embedding_parameters()), lr=5e-3)
    batch = {"image": torch.rand(1, size, size, 3) * 2 - 1, "caption": ["a photo of *"], "cache_key": ["image0"]}
    times, cpu_times = [], []
    for step in range(opt.warmup + opt.steps):
        begin, cpu_begin = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.shared_step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
        print(f"step {step}{' (warm-up)' if step < opt.warmup else ''}: {elapsed:.1f} s wall, {cpu:.1f} s CPU, "
              f"loss {loss.item():.4f}, load average {os.getloadavg()[0]:.2f}", flush=True)
        if step >= opt.warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    print(f"{opt.family} {config_path} at {size} px, batch 1, bf16, {opt.threads} threads: "
          f"{statistics.median(times):.1f} s/step (median of {len(times)}; {', '.join(f'{t:.1f}' for t in times)}; "
          f"CPU time {statistics.median(cpu_times):.1f} s/step, all threads), "
          f"built in {built_s:.0f} s, peak RSS {built_rss:.2f} GiB after building, {peak_rss_gib():.2f} GiB after "
          f"stepping, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
