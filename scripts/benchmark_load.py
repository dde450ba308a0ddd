"""Seconds and peak memory to load a model from its weights: ours (`load_model_from_config`, what txt2img.py and
evaluate_model.py do) against diffusers' own `from_pretrained` of the same-size modules.

    python scripts/benchmark_load.py                          # SD v1: a random 2.1 GB fp16 .safetensors
    python scripts/benchmark_load.py --family v2 xl --repeats 1   # SD 2.x and SDXL (~7 GB): ours only
    python scripts/benchmark_load.py --smoke --json out.json  # tiny config: seconds (the test's mode)

The script writes the files itself, in a temporary folder it deletes afterwards: random weights in fp16 under the
official keys, one single file per family, and for SD v1 (and the tiny config) the same weights converted by
diffusers' converters into diffusers' folders (`UNet2DConditionModel`, `AutoencoderKL`, transformers'
`CLIPTextModel`, each written by its own `save_pretrained` in fp16). Each load runs in a fresh process: ours builds
the config's LatentDiffusion and fills it from the file; the peer calls the three `from_pretrained` (fp32, their
default). Loads alternate over --repeats; wall time is that of the load call (imports are reported apart), peak
memory the process's high-water RSS. The files were just written, so both read them from the page cache.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)

import benchmark_common as bc  # noqa: E402

ROOT = bc.ROOT
FAMILIES = {"v1": "configs/stable-diffusion/v1-inference.yaml", "v2": "configs/stable-diffusion/v2-inference.yaml",
            "xl": "configs/stable-diffusion-xl/sd_xl_base-inference.yaml"}
WITH_PEER = ("v1", "smoke")  # diffusers' single converter pipeline used here covers SD v1 (CLIP ViT-L text)
PEER_PARTS = ("unet", "vae", "text_encoder")
TARGETS = {"load_time_ratio": 1.2, "load_cpu_time_ratio": 1.2, "peak_rss_ratio": 1.0}


def family_config(family):
    from omegaconf import OmegaConf
    if family == "smoke":  # as an inference config: no embedding manager (the peer loads none either)
        config = OmegaConf.merge(OmegaConf.load(bc.SMOKE_CONFIG), OmegaConf.from_dotlist(bc.SMOKE_OVERRIDES))
        config.model.params.pop("personalization_config")
        return config
    return OmegaConf.load(os.path.join(ROOT, FAMILIES[family]))


def empty_model(config):
    """Our model with its parameters on the meta device; a base model's file holds no embeddings: no manager."""
    from ldm.util import instantiate_from_config, parameters_on_meta
    config = config.copy()
    config.model.params.pop("personalization_config", None)
    with parameters_on_meta():
        return instantiate_from_config(config.model)


def random_model(config, seed):
    """Our model holding random fp16 weights (buffers such as the noise schedule as the config computes them)."""
    import torch
    model = empty_model(config)
    g = torch.Generator().manual_seed(seed)
    weights = {name: (torch.randn(p.shape, generator=g) * 0.02).half() for name, p in model.named_parameters()}
    model.load_state_dict(weights, strict=False, assign=True)
    return model


def weights_bytes(config):
    return sum(p.numel() for p in empty_model(config).parameters()) * 2


def check_room(families, workdir):
    """Refuse before writing anything if the files or the loads would not fit on this machine now."""
    need_disk = need_ram = 0
    for family in families:
        size = weights_bytes(family_config(family))
        need_disk += size * (2 if family in WITH_PEER else 1)
        need_ram = max(need_ram, size * 3)  # the fp32 model a load builds, plus the file being written or read
    free_disk = shutil.disk_usage(workdir).free
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    if need_disk > free_disk * 0.9 or need_ram > available * 0.9:
        raise SystemExit(f"benchmark_load: needs {need_disk / 2 ** 30:.1f} GiB free disk in {workdir} (has "
                         f"{free_disk / 2 ** 30:.1f}) and {need_ram / 2 ** 30:.1f} GiB available memory (has "
                         f"{available / 2 ** 30:.1f}); pass --workdir elsewhere or fewer --family.")


def write_files(family, workdir, seed):
    """-> (our single file, diffusers' folder or None)."""
    from ldm.checkpoint import save_state_dict
    config = family_config(family)
    model = random_model(config, seed)
    ours = os.path.join(workdir, f"{family}.safetensors")
    save_state_dict(model.state_dict(), ours)
    peer = None
    if family in WITH_PEER:
        peer = os.path.join(workdir, f"{family}-diffusers")
        for part, module in zip(PEER_PARTS, bc.diffusers_modules(model, config)):
            module.save_pretrained(os.path.join(peer, part), safe_serialization=True)
    return ours, peer


def load_ours(family, path):
    from ldm.checkpoint import load_model_from_config
    return load_model_from_config(family_config(family), path, verbose=False)


def load_diffusers(family, path):
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    # fp32, as a pipeline loads without torch_dtype (transformers 5 would otherwise keep the files' fp16)
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    return [UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"), torch_dtype=torch.float32).eval(),
            AutoencoderKL.from_pretrained(os.path.join(path, "vae"), torch_dtype=torch.float32).eval(),
            transformers.CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), **dtype).eval()]


def peak_rss_mib():
    """This process's high-water RSS since it started (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def measure(loop, family, path):
    """In a fresh process: seconds to import, seconds to load, peak RSS."""
    start = time.perf_counter()
    import torch
    if loop == "ours":
        import ldm.checkpoint  # noqa: F401
    else:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    imported, cpu = time.perf_counter(), time.process_time()
    loaded = load_ours(family, path) if loop == "ours" else load_diffusers(family, path)
    seconds, cpu = time.perf_counter() - imported, time.process_time() - cpu
    modules = loaded if isinstance(loaded, list) else [loaded]
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    if any(t.is_meta for t in tensors) or any(t.dtype == torch.float16 for t in tensors):
        raise RuntimeError(f"{loop} did not load real fp32 weights")
    accelerate = importlib.util.find_spec("accelerate") is not None  # diffusers' low-memory path needs it
    return {"loop": loop, "family": family, "import_seconds": imported - start, "load_seconds": seconds,
            "load_cpu_seconds": cpu,
            "accelerate": accelerate,
            "peak_rss_mib": peak_rss_mib(),
            "parameters": sum(t.numel() for m in modules for t in m.parameters())}


def run_child(loop, family, path, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", loop, family, path]
    cmd += ["--threads", str(threads)] if threads else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load of {family} by {loop} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs):
    keys = ("import_seconds", "load_seconds", "load_cpu_seconds", "peak_rss_mib")
    return {loop: {k: statistics.median(r[k] for r in rs) for k in keys}
            | {"parameters": rs[0]["parameters"], "accelerate": rs[0]["accelerate"]} for loop, rs in runs.items()}


def run(args):
    families = ["smoke"] if args.smoke else args.family
    report = {"torch": __import__("torch").__version__, "repeats": args.repeats, "load_average": os.getloadavg(),
              "families": {}}
    workdir = tempfile.mkdtemp(prefix="benchmark_load-", dir=args.workdir)
    try:
        check_room(families, workdir)
        for family in families:
            ours, peer = write_files(family, workdir, args.seed)
            cases = {"ours": ours} | ({"diffusers": peer} if peer else {})
            runs = {loop: [] for loop in cases}
            for rep in range(args.repeats):
                for loop in (list(cases) if rep % 2 == 0 else list(cases)[::-1]):
                    runs[loop].append(run_child(loop, family, cases[loop], args.threads))
                    r = runs[loop][-1]
                    print(f"[{family} {rep}] {loop}: load {r['load_seconds']:.2f} s ({r['load_cpu_seconds']:.2f} s CPU; "
                          f"imports {r['import_seconds']:.2f}"
                          f" s), peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
            summary = summarise(runs)
            entry = {"file_mib": os.path.getsize(ours) / 2 ** 20, "loops": summary, "runs": runs}
            if peer:
                entry["ratios"] = {
                    "load_time_ratio": summary["ours"]["load_seconds"] / summary["diffusers"]["load_seconds"],
                    "load_cpu_time_ratio": summary["ours"]["load_cpu_seconds"] / summary["diffusers"]["load_cpu_seconds"],
                    "peak_rss_ratio": summary["ours"]["peak_rss_mib"] / summary["diffusers"]["peak_rss_mib"]}
            report["families"][family] = entry
            for path in (ours, peer):  # multi-GB: gone before the next family is written
                if path and os.path.isdir(path):
                    shutil.rmtree(path)
                elif path:
                    os.remove(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def format_report(report):
    lines = [f"Loading random fp16 weights, torch {report['torch']}, {report['repeats']} alternated repeat(s), "
             f"load average at start {', '.join(f'{x:.2f}' for x in report['load_average'])}"]
    for family, entry in report["families"].items():
        lines.append(f"{family}: single file {entry['file_mib']:.0f} MiB")
        for loop, r in entry["loops"].items():
            lines.append(f"  {loop:<10} load {r['load_seconds']:>7.2f} s ({r['load_cpu_seconds']:.2f} s CPU)  "
                         f"imports {r['import_seconds']:>5.2f} s  "
                         f"peak RSS {r['peak_rss_mib']:>7.0f} MiB  ({r['parameters']:,} parameters"
                         + (", accelerate installed)" if loop == "diffusers" and r["accelerate"] else ")"))
        for name, value in entry.get("ratios", {}).items():
            verdict = "met" if value <= TARGETS[name] else "NOT met"
            lines.append(f"  {name} ours/diffusers {value:.2f} (target <= {TARGETS[name]}: {verdict})")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=["v1"],
                   help="model families to load (v2 and xl: ours only, no diffusers peer)")
    p.add_argument("--smoke", action="store_true", help="the tiny config against diffusers: seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads in each load process")
    p.add_argument("--workdir", default=None, help="where the temporary files go (default: the system's temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, metavar=("LOOP", "FAMILY", "PATH"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(*args.child)))
        return None
    report = run(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
