"""The paper's ablation on toy world v2: reconstruction vs editability of each textual-inversion variant.

    python scripts/ablation_v2.py                          # every variant, every v2 concept
    python scripts/ablation_v2.py --concepts orange-striped-circle,rose-solid-diamond --max_steps 600 --jobs 2

Each variant is one run of scripts/benchmark_concepts.py --world v2 (same concepts, training steps, seeds and
sampling), its recipe the original's (configs/toy/recipes/original.yaml) plus the variant's overlay (and, for
comparison, the v1 toy default as it is); the benchmark's own resumption makes an interrupted ablation carry on.
The references need no training: the init word and the paper's "human captions" (the words that fit the
identity, `Concept.human_caption`), scored by every benchmark run alike. OUTDIR/ablation.md is the table (means
over the concepts, the worst concept on each axis), ablation.json the numbers, ablation.png reconstruction
against edits obeyed, one point per variant (the paper's Fig. 10, with the toy evaluator's rates in place of CLIP
image and text similarities).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_concepts import V2_COLUMNS as AXES, summarise as summarise_benchmark  # noqa: E402

BASE = ["configs/toy/finetune-shapes.yaml", "configs/toy/recipes/original.yaml"]
V2_OVERLAY = "configs/toy/finetune-shapes-v2.yaml"
# (name, what it is, its recipe: the configs merged before the v2 overlay); all but the last are the original's
# recipe plus one change.
VARIANTS = (
    ("original", "the original's recipe: 1 vector, t over the whole schedule, lr 5e-3", BASE),
    ("two-vectors", "2 vectors for *", [*BASE, "configs/toy/recipes/two-vectors.yaml"]),
    ("progressive", "3 vectors, switched on one at a time", [*BASE, "configs/toy/recipes/progressive.yaml"]),
    ("per-image-tokens", "a word of its own for each image, besides *",
     [*BASE, "configs/toy/recipes/per-image-tokens.yaml"]),
    ("bigger-lr", "base lr 2e-2 (4x)", [*BASE, "configs/toy/recipes/bigger-lr.yaml"]),
    ("regulariser", "L2 pull toward the init word, weight 0.01", [*BASE, "configs/toy/recipes/regulariser.yaml"]),
    ("xti", "XTI: 1 vector per cross-attention layer", [*BASE, "configs/toy/recipes/xti.yaml"]),
    ("toy-v1-default", "the v1 toy default: XTI, 48 vectors, 70% of t from [700, 1000)",
     ["configs/toy/finetune-shapes.yaml"]),
)
REFERENCES = (("init", "init word (no training)"), ("human", "human captions (no training)"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: all): "
                   + ", ".join(name for name, _, _ in VARIANTS))
    p.add_argument("--concepts", default=None, help="comma-separated v2 concepts (default: all twelve)")
    p.add_argument("--max_steps", type=int, default=600, help="training steps of every variant")
    p.add_argument("--n_samples", type=int, default=32, help="samples per prompt")
    p.add_argument("--ddim_steps", type=int, default=25)
    p.add_argument("--curve_every", type=int, default=200)
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (each with one thread per job)")
    p.add_argument("--outdir", default="outputs/ablation_v2")
    p.add_argument("--ckpt", default=None, help="the v2 base model (default: the benchmark's)")
    opt = p.parse_args(argv)
    known = {name for name, _, _ in VARIANTS}
    opt.variants = opt.variants.split(",") if opt.variants else [name for name, _, _ in VARIANTS]
    unknown = [v for v in opt.variants if v not in known]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if opt.jobs < 1:
        p.error("--jobs must be at least 1")
    return opt


def benchmark_command(opt, name, recipe):
    cmd = [sys.executable, "scripts/benchmark_concepts.py", "--world", "v2", "--recipe", *recipe, V2_OVERLAY,
           "--outdir", str(Path(opt.outdir) / name), "--max_steps", str(opt.max_steps),
           "--n_samples", str(opt.n_samples), "--ddim_steps", str(opt.ddim_steps),
           "--curve_every", str(opt.curve_every)]
    if opt.concepts:
        cmd += ["--concepts", opt.concepts]
    if opt.ckpt:
        cmd += ["--ckpt", opt.ckpt]
    return cmd


def run_variants(opt):
    """Run the variants' benchmarks, opt.jobs at a time; each logs to OUTDIR/<variant>.log."""
    import os
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if opt.jobs > 1 else "2")}
    todo = [(name, recipe) for name, _, recipe in VARIANTS if name in opt.variants]
    running, failed = [], []
    Path(opt.outdir).mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < opt.jobs:
            name, recipe = todo.pop(0)
            log = open(Path(opt.outdir) / f"{name}.log", "a")
            print(f"{name}: started (log {log.name})", flush=True)
            running.append((name, log, subprocess.Popen(benchmark_command(opt, name, recipe), cwd=ROOT,
                                                        stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for item in list(running):
            name, log, proc = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"{name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}",
                      flush=True)
                if proc.returncode:
                    failed.append(name)
    return failed


def collect(opt):
    """{row name: {"label", "mean": {axis: rate}, "worst": {axis: (concept, rate)}, "n"}} from the runs."""
    rows, references = {}, {}
    for name, label, _ in VARIANTS:
        path = Path(opt.outdir) / name / "results.json"
        if name not in opt.variants or not path.is_file():
            continue
        concepts = json.loads(path.read_text())["concepts"]
        if opt.concepts:  # a variant's folder may hold more concepts (an earlier, wider run): compare like with like
            wanted = opt.concepts.split(",")
            concepts = [c for c in concepts if c["concept"] in wanted]
            if len(concepts) != len(wanted):
                print(f"{name}: {path} lacks some of --concepts; left out of the table", flush=True)
                continue
        rows[name] = summarise(concepts, "learned", label)
        for key, ref_label in REFERENCES:  # the same for every variant: the base model alone
            if key not in references and all(key in c for c in concepts):
                references[key] = summarise(concepts, key, ref_label)
    return rows, references


IDENTITY = ("hue", "pattern", "shape")  # what reconstruction asks for, each read on its own


def summarise(concepts, key, label):
    """The benchmark's own summary of one row (learned word or a reference), plus each identity attribute's rate
    on the reconstruction prompt: which part of the identity a word keeps."""
    summary = summarise_benchmark([{"learned": c[key], "concept": c["concept"]} for c in concepts])["learned"]
    mean = {**summary["mean"],
            **{a: sum(c[key]["prompts"][0][f"rate_{a}"] for c in concepts) / len(concepts) for a in IDENTITY}}
    worst = {a: (one["concept"], one[a]) for a, one in summary["worst"].items()}
    return {"label": label, "mean": mean, "worst": worst, "n": len(concepts),
            "concepts": sorted(c["concept"] for c in concepts)}


def markdown(rows, references, opt):
    def pct(x):
        return f"{100 * x:.0f}%"
    lines = [f"{opt.max_steps} training steps per concept, {opt.n_samples} samples per prompt, DDIM "
             f"{opt.ddim_steps}; means over {next(iter(rows.values()))['n'] if rows else 0} concepts", "",
             "| variant | reconstruction | editability | identity under edits | edits obeyed | sum | hue / pattern / "
             "shape kept | worst reconstruction | worst editability |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in list(rows.items()) + list(references.items()):
        m, w = row["mean"], row["worst"]
        lines.append(f"| {name}: {row['label']} | " + " | ".join(pct(m[a]) for a in AXES)
                     + f" | {pct(m['reconstruction'] + m['editability'])} | "
                     + " / ".join(pct(m[a]) for a in IDENTITY) + " | "
                     + " | ".join(f"{w[a][0]} {pct(w[a][1])}" for a in AXES[:2]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, references, path):
    """Reconstruction (y) against edits obeyed (x), one labelled point per variant and reference: the paper's
    Fig. 10 puts image similarity against the edited prompt's text similarity, which asks whether the edit is
    followed, not whether the identity survives it (that is the table's editability)."""
    from evaluation.learning_curves import plot_curves
    points = {name: [(row["mean"]["edits_obeyed"], row["mean"]["reconstruction"])]
              for name, row in list(rows.items()) + list(references.items())}
    image = plot_curves(points, None, title="toy world v2: reconstruction vs edits obeyed (means over concepts)",
                        x_label="edits obeyed (place or size as asked)", y_label="reconstruction (identity kept)",
                        y_range=(0, min(1.0, 0.1 + max(y for (_, y), in points.values()))), x_range=(0, 1),
                        size=(820, 520))
    image.save(path)
    return image


def main(argv=None):
    opt = parse_args(argv)
    start = time.time()
    failed = run_variants(opt)
    rows, references = collect(opt)
    if not rows:
        raise SystemExit(f"no variant finished; see the logs in {opt.outdir}")
    table = markdown(rows, references, opt)
    out = Path(opt.outdir)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"settings": vars(opt), "variants": rows,
                                                   "references": references}, indent=2))
    plot(rows, references, out / "ablation.png")
    print("\n" + table + f"\nwritten: {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}; "
          f"{time.time() - start:.0f} s")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their logs in {opt.outdir})")


if __name__ == "__main__":
    main()
