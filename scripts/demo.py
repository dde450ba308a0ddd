"""`make demo`: textual inversion of the toy concept on the shipped toy model, end to end, on the CPU.

1. the concept: five images of a large magenta triangle in the top half (data/toy_concept/);
2. `main.py` learns `*` from them, starting from the word "triangle";
3. `scripts/txt2img.py --embedding_path` samples "a photo of *" and, for comparison, "a photo of a triangle";
4. the toy evaluator reads colour, shape, size and position off every sample and reports match rates;
5. a grid (concept images | init-word samples | learned-`*` samples) and the numbers land in outputs/demo/.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = "magenta triangle large top"


def run(cmd, what):
    print(f"\n=== {what}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    start = time.time()
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)
    return time.time() - start


def newest_run(logdir):
    runs = sorted((p for p in Path(logdir).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no training run was written under {logdir}")
    return runs[-1]


def sample(opt, prompt, embedding, outdir):
    return run([sys.executable, "scripts/txt2img.py", "--config", opt.inference_config, "--ckpt", opt.ckpt,
                "--embedding_path", embedding, "--prompt", prompt, "--outdir", outdir,
                "--n_samples", opt.n_samples, "--n_iter", 1, "--ddim_steps", opt.ddim_steps, "--scale", opt.scale,
                "--H", 32, "--W", 32, "--f", 4, "--C", 4, "--seed", opt.sample_seed, "--precision", "full",
                "--n_rows", 16, "--skip_grid"], f"sampling {prompt!r}")


def evaluate(images_dir, prompt, json_path):
    run([sys.executable, "scripts/evaluate_model.py", "--images_dir", images_dir, "--toy_target", TARGET,
         "--prompt", prompt, "--json", json_path], f"evaluating {prompt!r}")
    return json.loads(Path(json_path).read_text())


def grid_png(rows, labels, path, scale=3, label_width=190):
    """Rows of PNG files -> one labelled image, 16 columns at most, upscaled for viewing."""
    from PIL import Image, ImageDraw
    from ldm.util import load_font
    cols = max(len(r) for r in rows)
    cell = 32 * scale + 4
    out = Image.new("RGB", (label_width + cols * cell + 4, len(rows) * cell + 4), (40, 40, 40))
    draw, font = ImageDraw.Draw(out), load_font(16)
    for i, (row, label) in enumerate(zip(rows, labels)):
        draw.text((8, 4 + i * cell + cell // 2 - 10), label, fill="white", font=font)
        for j, f in enumerate(row):
            img = Image.open(f).convert("RGB").resize((32 * scale, 32 * scale), Image.Resampling.NEAREST)
            out.paste(img, (label_width + 4 + j * cell, 4 + i * cell))
    out.save(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", default="outputs/demo")
    p.add_argument("--concept", default="data/toy_concept")
    p.add_argument("--config", default="configs/toy/finetune-shapes.yaml")
    p.add_argument("--inference_config", default="configs/toy/txt2img-shapes-inference.yaml")
    p.add_argument("--ckpt", default="models/toy/shapes-ldm.safetensors")
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--n_samples", type=int, default=64)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=23, help="training seed")
    p.add_argument("overrides", nargs="*", help="config overrides for main.py, e.g. "
                   "model.params.personalization_config.params.num_vectors_per_token=2")
    p.add_argument("--sample_seed", type=int, default=42)
    opt = p.parse_args(argv)
    from ldm.data.personalized import list_images
    from ldm.data.shapes import write_concept

    start = time.time()
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    concept = Path(opt.concept)
    if not concept.is_dir() or not any(concept.iterdir()):
        print(f"writing the demo concept to {concept}")
        write_concept(str(concept))
    if not Path(opt.ckpt).is_file():
        raise SystemExit(f"the toy model {opt.ckpt} is missing: it ships with the repository (see docs/toy_model.md)")

    logdir = out / "logs"
    train = [sys.executable, "main.py", "--base", opt.config, "-t", "--actual_resume", opt.ckpt,
             "--data_root", concept, "--init_word", "triangle", "-n", "demo", "-l", logdir, "--seed", opt.seed,
             "--accelerator", "cpu", "--no-test", "true"]
    if opt.max_steps:
        train += ["--max_steps", opt.max_steps]
    train += opt.overrides
    times = {"train_s": run(train, "textual inversion of the demo concept")}
    embedding = newest_run(logdir) / "checkpoints" / "embeddings.pt"

    results, rows = {}, [list_images(str(concept))]
    for key, prompt in (("init_word", "a photo of a triangle"), ("learned", "a photo of *")):
        folder = out / key
        shutil.rmtree(folder, ignore_errors=True)  # the sampling script numbers on; evaluate this run's only
        times[f"sample_{key}_s"] = sample(opt, prompt, embedding, folder)
        images = sorted((folder / "samples").glob("*.png"))
        report = evaluate(folder / "samples", prompt, out / f"{key}.json")
        results[key] = {"prompt": prompt, **report["generated"]}
        rows.append(images[:12])
    labels = ["concept images", "a photo of a triangle", "a photo of *"]
    grid = grid_png(rows, labels, out / "demo_grid.png")
    summary = {"target": TARGET, "embedding": str(embedding), "n_samples": opt.n_samples, "train_seed": opt.seed,
               "sample_seed": opt.sample_seed, "ddim_steps": opt.ddim_steps, "scale": opt.scale,
               "results": results, "seconds": {**times, "total_s": time.time() - start}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    print(f"\n=== results (target: {TARGET}; {opt.n_samples} samples each, seed {opt.sample_seed})")
    metrics = [m for m in results["learned"] if m.startswith("toy_")]
    print(f"{'':28}" + "".join(f"{m[4:]:>10}" for m in metrics))
    for key, r in results.items():
        print(f"{r['prompt']:28}" + "".join(f"{r[m]:>10.2f}" for m in metrics))
    print(f"\ngrid (concept | 'a photo of a triangle' | 'a photo of *'): {grid}")
    print(f"numbers: {out / 'results.json'}; total {time.time() - start:.0f} s")
    return summary


if __name__ == "__main__":
    main()
