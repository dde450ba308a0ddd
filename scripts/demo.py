"""`make demo`: textual inversion of a toy concept on the shipped toy model, end to end, on the CPU.

1. the concept: five images of one identity of toy world v2 (`ldm.data.shapes_v2.DEMO_CONCEPT`: an azure striped
   square; azure is one of the hues no word names), in five places and both sizes (data/toy_concept_v2/);
2. `main.py` learns `*` from them with the v2 toy default recipe, starting from the word "square";
3. `scripts/txt2img.py --embedding_path` samples what words can say ("a photo of a striped square"), the learned
   word ("a photo of *": reconstruction) and the learned word under an edit ("a photo of * on the left");
4. the v2 evaluator reads hue, shape, pattern, size and position off every sample and reports match rates;
5. a grid (concept images | the three prompts' samples) and the numbers land in outputs/demo/.
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
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_concepts import EDITS, RECONSTRUCTION, WORLDS  # noqa: E402

# The v2 toy default (the recipe chosen on benchmark v2, docs/method.md), model and sampling config: the benchmark's.
V2 = WORLDS["v2"]


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


def evaluate(images_dir, prompt, target, json_path):
    run([sys.executable, "scripts/evaluate_model.py", "--images_dir", images_dir, "--toy_world", "v2",
         "--toy_target", target, "--prompt", prompt, "--json", json_path], f"evaluating {prompt!r}")
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


def prompts(concept):
    """(key, prompt, target words, label): what words can say, the learned word, the learned word edited (the
    benchmark's reconstruction prompt and first edit)."""
    edit, asked = EDITS[0]
    return (("human", RECONSTRUCTION.format(concept.human_caption), concept.target, f"'{concept.human_caption}'"),
            ("learned", RECONSTRUCTION.format("*"), concept.target, f"'{RECONSTRUCTION.format('*')}'"),
            ("edit", edit.format("*"), f"{concept.target} {asked}", f"'{edit.format('*')}'"))


def main(argv=None):
    from ldm.data.shapes_v2 import DEMO_CONCEPT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", default="outputs/demo")
    p.add_argument("--concept", default="data/toy_concept_v2",
                   help="folder of the demo concept's images (written when missing)")
    p.add_argument("--config", nargs="+", default=list(V2["recipe"]), help="main.py --base files, in order")
    p.add_argument("--inference_config", default=V2["inference_config"])
    p.add_argument("--ckpt", default=V2["ckpt"])
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

    start = time.time()
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(opt.concept)
    if not folder.is_dir() or not any(folder.iterdir()):
        print(f"writing the demo concept ({DEMO_CONCEPT.target}) to {folder}")
        DEMO_CONCEPT.write(str(folder))
    if not Path(opt.ckpt).is_file():
        raise SystemExit(f"the toy model {opt.ckpt} is missing: it ships with the repository (see docs/toy_model.md)")

    logdir = out / "logs"
    train = [sys.executable, "main.py", "--base", *opt.config, "-t", "--actual_resume", opt.ckpt,
             "--data_root", folder, "--init_word", DEMO_CONCEPT.init_word, "-n", "demo", "-l", logdir,
             "--seed", opt.seed, "--accelerator", "cpu", "--no-test", "true"]
    if opt.max_steps:
        train += ["--max_steps", opt.max_steps]
    train += opt.overrides
    times = {"train_s": run(train, "textual inversion of the demo concept")}
    embedding = newest_run(logdir) / "checkpoints" / "embeddings.pt"

    results, rows, labels = {}, [list_images(str(folder))], ["concept images"]
    for key, prompt, target, label in prompts(DEMO_CONCEPT):
        samples = out / key
        shutil.rmtree(samples, ignore_errors=True)  # the sampling script numbers on; evaluate this run's only
        times[f"sample_{key}_s"] = sample(opt, prompt, embedding, samples)
        report = evaluate(samples / "samples", prompt, target, out / f"{key}.json")
        results[key] = {"prompt": prompt, "target": target, **report["generated"]}
        rows.append(sorted((samples / "samples").glob("*.png"))[:12])
        labels.append(label)
    grid = grid_png(rows, labels, out / "demo_grid.png", label_width=250)
    summary = {"concept": DEMO_CONCEPT.name, "embedding": str(embedding), "n_samples": opt.n_samples,
               "train_seed": opt.seed, "sample_seed": opt.sample_seed, "ddim_steps": opt.ddim_steps,
               "scale": opt.scale, "results": results, "seconds": {**times, "total_s": time.time() - start}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    print(f"\n=== results (concept: {DEMO_CONCEPT.target}; {opt.n_samples} samples each, seed {opt.sample_seed})")
    metrics = ("toy_hue", "toy_pattern", "toy_shape", "toy_column", "toy_joint")
    print(f"{'':36}" + "".join(f"{m[4:]:>9}" for m in metrics))
    for r in results.values():
        print(f"{r['prompt']:36}" + "".join(f"{r[m]:>9.2f}" if m in r else f"{'-':>9}" for m in metrics))
    print(f"\ngrid (concept | {' | '.join(labels[1:])}): {grid}")
    print(f"numbers: {out / 'results.json'}; total {time.time() - start:.0f} s")
    return summary


if __name__ == "__main__":
    main()
