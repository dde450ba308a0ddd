"""Concept benchmark: textual inversion of every toy concept with one recipe, scored by the toy evaluator.

    python scripts/benchmark_concepts.py                       # all 12 concepts, the shipped recipe
    python scripts/benchmark_concepts.py --quick               # 3 concepts, 300 steps, 32 samples: a smoke run
    python scripts/benchmark_concepts.py --recipe configs/toy/finetune-shapes.yaml configs/toy/recipes/original.yaml

For each concept of ldm.data.shapes.CONCEPTS (data/concepts/<name>/, written if missing): `main.py` learns `*`
from its five images starting from its shape's word (the recipe's configs, merged left to right, plus any
`key=value` overrides; a fixed training seed) with the learning-curve callback on; then "a photo of *" and
"a photo of a <shape>" are sampled (fixed seeds) and the samples scored against the concept's target (colour,
shape, size class, region). Per-concept results land in OUTDIR/<concept>/result.json as they are done, so an
interrupted benchmark run again with the same options carries on (a half-trained concept resumes from its
last checkpoint); OUTDIR/results.json, results.md (tables), curves.png (every concept's joint rate vs step)
and grid.png (concept images | init word | learned word) sum it up.

    python scripts/benchmark_concepts.py --world v2            # world v2: reconstruction and editability

World v2 (`ldm/data/shapes_v2.py`, its CONCEPTS in data/concepts_v2/, the v2 model and recipe): a concept is
an identity (hue, fill pattern, shape) the words cannot fully say, its five images in five places and both
sizes. The learned word is scored on (a) reconstruction: "a photo of *" keeps the identity (all three right),
and (b) editability: each prompt of EDITS keeps the identity and obeys its edit (position or size); per
concept, the means, and the same prompts with the init word in place of `*`.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_RECIPE = "configs/toy/finetune-shapes.yaml"
QUICK_CONCEPTS = "magenta-triangle-large-top,red-circle-small-top-left,cyan-circle-medium-centre"
V2_OVERLAY = "finetune-shapes-v2.yaml"  # what the v2 model needs on top of any recipe
# Per world: the recipe, concept folders, model, inference config and --quick's concepts.
WORLDS = {
    "v1": dict(recipe=[DEFAULT_RECIPE], data="data/concepts", ckpt="models/toy/shapes-ldm.safetensors",
               inference_config="configs/toy/txt2img-shapes-inference.yaml", quick=QUICK_CONCEPTS),
    # v2's recipe: the original's with the paper's progressive words (three vectors, switched on one at a time), the
    # best sum of reconstruction and editability in the paper's ablation on world v2 and on all twelve concepts
    # (docs/method.md), with the v2 model's overlay
    "v2": dict(recipe=[DEFAULT_RECIPE, "configs/toy/recipes/original.yaml", "configs/toy/recipes/progressive.yaml",
                       f"configs/toy/{V2_OVERLAY}"],
               data="data/concepts_v2",
               ckpt="models/toy/shapes-v2-ldm.safetensors",
               inference_config="configs/toy/txt2img-shapes-v2-inference.yaml",
               quick="orange-striped-circle,rose-solid-diamond,violet-two-tone-cross"),
}
# World v2's edits: (prompt, what the edit asks). "{}" is the subject ("*" or "a <init word>"), "{noun}" the
# bare word ("*" or "<init word>").
EDITS = (("a photo of {} on the left", "left"), ("a photo of {} at the bottom", "bottom"),
         ("a small {noun}", "small"), ("a photo of a large {noun}", "large"),
         ("{} in the top right", "top-right"), ("a photo of {} in the bottom left", "bottom-left"))
RECONSTRUCTION = "a photo of {}"
QUICK = dict(max_steps=300, n_samples=32, curve_every=50)
ATTRIBUTES = ("colour", "shape", "size", "region")
ROW_PADDING = 2  # between the 32x32 samples of the learned.png / init_word.png rows


def repo_path(path):
    """A path given from the working directory, as the repository's commands see it: relative to the repository
    root when inside it (so settings and tables read the same from any clone), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", choices=sorted(WORLDS), default="v1",
                   help="v1: the 12 layout concepts; v2: the 12 identity concepts, scored on reconstruction and "
                        "editability (each world's defaults for the options below)")
    p.add_argument("--recipe", nargs="+", default=None,
                   help="training config(s) for main.py --base, merged left to right (default: the world's; a v2 "
                        "recipe ends with configs/toy/finetune-shapes-v2.yaml)")
    p.add_argument("--concepts", default=None, help="comma-separated concept names (default: all, or --quick's)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK_CONCEPTS.count(',') + 1} concepts, {QUICK['max_steps']} steps, "
                        f"{QUICK['n_samples']} samples, unless given")
    p.add_argument("--outdir", default=None, help="default: outputs/benchmark/<last recipe's name>[-quick]")
    p.add_argument("--data", default=None, help="concept folders (written here when missing; default: the world's)")
    p.add_argument("--ckpt", default=None, help="the base model (default: the world's)")
    p.add_argument("--inference_config", default=None, help="default: the world's")
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=23, help="training seed")
    p.add_argument("--n_samples", type=int, default=None, help="samples per prompt (default 64)")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=10.0, help="classifier-free guidance scale for sampling")
    p.add_argument("--sample_seed", type=int, default=42)
    p.add_argument("--curve_every", type=int, default=None, help="learning-curve interval in steps (default 100)")
    p.add_argument("--curve_samples", type=int, default=8)
    p.add_argument("--curve_ddim_steps", type=int, default=10)
    p.add_argument("--init_cache", default="outputs/benchmark/init-word-cache",
                   help="where the init word's scores are kept: they do not depend on the recipe, so every recipe "
                        "after the first reuses them ('' to always sample)")
    p.add_argument("overrides", nargs="*", help="config overrides for main.py, e.g. model.base_learning_rate=0.01")
    opt = p.parse_args(argv)
    world = WORLDS[opt.world]
    opt.recipe = opt.recipe or [str(ROOT / f) for f in world["recipe"]]
    for key in ("data", "ckpt", "inference_config"):
        setattr(opt, key, getattr(opt, key) or str(ROOT / world[key]))
    for key, quick in QUICK.items():
        if getattr(opt, key) is None and opt.quick:
            setattr(opt, key, quick)
    opt.n_samples = opt.n_samples or 64
    opt.curve_every = opt.curve_every or 100
    if opt.quick and not opt.concepts:
        opt.concepts = world["quick"]
    if opt.outdir is None:
        named = [Path(f).stem for f in opt.recipe if Path(f).name != V2_OVERLAY] or ["recipe"]
        opt.outdir = str(ROOT / "outputs/benchmark" / ("v2" if opt.world == "v2" else "")
                         / (named[-1] + ("-quick" if opt.quick else "")))
    opt.recipe = [repo_path(f) for f in opt.recipe]
    for key in ("outdir", "data", "ckpt", "inference_config"):
        setattr(opt, key, repo_path(getattr(opt, key)))
    bad = [f for f in opt.recipe + [opt.ckpt, opt.inference_config] if not (ROOT / f).is_file()]
    if bad:
        p.error(f"not found: {', '.join(bad)} (the recipe is one or more training YAMLs, e.g. {DEFAULT_RECIPE})")
    return opt


def ckpt_digest(opt):
    """sha256 of the base model's file (once per run): a model retrained under the same path is another model."""
    if getattr(opt, "_ckpt_sha256", None) is None:
        import hashlib
        opt._ckpt_sha256 = hashlib.sha256((ROOT / opt.ckpt).read_bytes()).hexdigest()
    return opt._ckpt_sha256


def settings_of(opt):
    """What a concept's result depends on: results made with other settings are never mixed in."""
    keys = ("recipe", "overrides", "ckpt", "max_steps", "seed", "n_samples", "ddim_steps", "scale", "sample_seed",
            "curve_every", "curve_samples", "curve_ddim_steps")
    settings = {**{k: getattr(opt, k) for k in keys}, "ckpt_sha256": ckpt_digest(opt)}
    return settings if opt.world == "v1" else {"world": opt.world, **settings}  # v1's keep their old keys


def run(cmd, log_path):
    """Run a command from the repository root, its output appended to log_path; raise with the log's tail."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        log.flush()
        code = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{tail}\nthe command above failed (exit {code}); full log: {log_path}")


def runs_in(logdir):
    return sorted((p for p in Path(logdir).glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime) \
        if Path(logdir).is_dir() else []


def train(opt, concept, folder, data_root):
    """main.py on one concept; resumes an interrupted run of this benchmark. -> (run folder, seconds)."""
    logdir = folder / "logs"
    curve = "lightning.callbacks.learning_curve"
    partial = [r for r in runs_in(logdir) if (r / "checkpoints" / "last.ckpt").is_file()]
    cmd = [sys.executable, "main.py", "--accelerator", "cpu", "--no-test", "true"]
    if partial:
        print(f"  resuming the interrupted training in {partial[-1]}", flush=True)
        cmd += ["-r", partial[-1]]
    else:
        cmd += ["--base", *opt.recipe, "-t", "--actual_resume", opt.ckpt, "--data_root", data_root,
                "--init_word", concept.init_word, "-n", concept.name, "-l", logdir, "--seed", opt.seed,
                "--datadir_in_name", "false",
                f"{curve}.target=evaluation.learning_curves.LearningCurve", f"{curve}.params.toy_target={concept.target}",
                f"{curve}.params.every_n_steps={opt.curve_every}", f"{curve}.params.n_samples={opt.curve_samples}",
                f"{curve}.params.ddim_steps={opt.curve_ddim_steps}", f"{curve}.params.scale={opt.scale}",
                f"{curve}.params.toy_world={opt.world}", *opt.overrides]
    if opt.max_steps:
        cmd += ["--max_steps", opt.max_steps]
    start = time.time()
    run(cmd, folder / "train.log")
    return runs_in(logdir)[-1], time.time() - start


def sample(model, prompt, opt):
    from evaluation import sample_images
    return sample_images(model, prompt, opt.n_samples, ddim_steps=opt.ddim_steps, scale=opt.scale,
                         seed=opt.sample_seed, batch_size=64)


def score(model, concept, prompt, opt):
    from evaluation.shapes_eval import evaluate_images, parse_target
    images = sample(model, prompt, opt)
    result = evaluate_images(list(images), parse_target(concept.target))
    return {"prompt": prompt, **result["rates"], "joint": result["joint"]}, images


def v2_prompts(subject, noun):
    """World v2's prompts for one word: [(prompt, edit words or "")], reconstruction first."""
    return [(RECONSTRUCTION.format(subject), "")] + [(t.format(subject, noun=noun), edit) for t, edit in EDITS]


def score_v2(model, concept, subject, noun, opt):
    """Reconstruction ("a photo of <subject>" keeps the identity) and editability (each edit keeps the identity
    and is obeyed), per prompt and their summary. -> (rates, the reconstruction prompt's images)."""
    from evaluation.shapes_v2_eval import evaluate_images, parse_target
    identity = parse_target(concept.target)
    prompts, first_images = [], None
    for prompt, edit in v2_prompts(subject, noun):
        images = sample(model, prompt, opt)
        first_images = images if first_images is None else first_images
        asked = parse_target(edit)
        result = evaluate_images(list(images), {**identity, **asked})
        kept = [all(a[k] == v for k, v in identity.items()) for a in result["analyses"]]
        obeyed = [all(a[k] == v for k, v in asked.items()) for a in result["analyses"]]
        prompts.append({"prompt": prompt, "edit": edit, "identity": sum(kept) / len(kept),
                        "edit_obeyed": sum(obeyed) / len(obeyed), "joint": result["joint"],
                        **{f"rate_{k}": v for k, v in result["rates"].items()}})
    edits = prompts[1:]
    rates = {"reconstruction": prompts[0]["joint"], "editability": sum(p["joint"] for p in edits) / len(edits),
             "identity_under_edits": sum(p["identity"] for p in edits) / len(edits),
             "edits_obeyed": sum(p["edit_obeyed"] for p in edits) / len(edits), "prompts": prompts}
    return rates, first_images


def score_word(model, concept, subject, noun, opt):
    """The world's scores of one word (the learned `*` or the init word's phrase)."""
    if opt.world == "v2":
        return score_v2(model, concept, subject, noun, opt)
    return score(model, concept, RECONSTRUCTION.format(subject), opt)


def save_row(images, path, n=8):
    from ldm.util import make_grid, to_pil
    to_pil(make_grid(images[:n], nrow=n, padding=ROW_PADDING)).save(path)


def reference_score(model, concept, opt, folder, subject, noun, name):
    """Score a phrase in place of `*` (the init word's "a <shape>", v2's human caption): the base model alone
    draws it, so the result depends on the checkpoint, the inference config and the sampling settings but not on
    the recipe, and is kept in --init_cache for the next recipe. -> the rates, with <name>.png written to folder."""
    import hashlib
    import shutil
    prompt = RECONSTRUCTION.format(subject) if opt.world == "v1" else [p for p, _ in v2_prompts(subject, noun)]
    key = {"ckpt_sha256": ckpt_digest(opt),
           "inference_config": (ROOT / opt.inference_config).read_text(), "prompt": prompt,
           "target": concept.target, **{k: getattr(opt, k) for k in ("n_samples", "ddim_steps", "scale",
                                                                      "sample_seed")}}
    cache = ROOT / opt.init_cache / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] \
        if opt.init_cache else None
    if cache and (cache / "result.json").is_file() and (cache / "images.png").is_file():
        shutil.copyfile(cache / "images.png", folder / f"{name}.png")
        print(f"  {name.replace('_', ' ')}: scored before ({subject!r}), {cache}", flush=True)
        return json.loads((cache / "result.json").read_text())["rates"]
    rates, images = score_word(model, concept, subject, noun, opt)
    save_row(images, folder / f"{name}.png")
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / f"{name}.png", cache / "images.png")
        (cache / "result.json").write_text(json.dumps({"key": key, "rates": rates}, indent=2))
    return rates


def previous_result(opt, concept, outdir):
    """The concept's result from an earlier run of this benchmark with the same settings, or None."""
    result_path = outdir / concept.name / "result.json"
    if not result_path.is_file():
        return None
    done, settings = json.loads(result_path.read_text()), settings_of(opt)
    if done["settings"] != settings:
        changed = sorted(k for k in settings if done["settings"].get(k) != settings[k])
        raise SystemExit(f"{result_path} was made with other settings ({', '.join(changed)}): "
                         "give another --outdir, or delete that concept's folder to redo it.")
    return done


def benchmark_concept(opt, model, concept, outdir):
    """Train, sample and score one concept."""
    from ldm.models.diffusion.textual_inversion import load_embeddings
    folder = outdir / concept.name
    result_path = folder / "result.json"
    settings = settings_of(opt)
    folder.mkdir(parents=True, exist_ok=True)
    data_root = ROOT / opt.data / concept.name
    if not data_root.is_dir():
        concept.write(str(data_root))
    print(f"{concept.name}: training ({concept.target}, init word {concept.init_word!r})", flush=True)
    run_dir, train_s = train(opt, concept, folder, data_root)
    # by the file's own names: "*" (and a per-image-tokens recipe's extra words); XTI files too
    load_embeddings(model, [str(run_dir / "checkpoints" / "embeddings.pt")])
    start = time.time()
    learned, learned_images = score_word(model, concept, "*", "*", opt)
    save_row(learned_images, folder / "learned.png")
    init = reference_score(model, concept, opt, folder, f"a {concept.init_word}", concept.init_word, "init_word")
    references = {"init": init}
    if opt.world == "v2":  # the paper's "human captions": what the words can say of the identity
        caption = concept.human_caption
        references["human"] = reference_score(model, concept, opt, folder, caption, caption[2:], "human_caption")
    curve_path = run_dir / "images" / "learning_curve.json"
    curve = json.loads(curve_path.read_text())["history"] if curve_path.is_file() else []
    result = {"concept": concept.name, "target": concept.target, "init_word": concept.init_word,
              "data_root": str(data_root),
              "learned": learned, **references, "curve": curve, "run": str(run_dir),
              "seconds": {"train": round(train_s, 1), "sample": round(time.time() - start, 1)},
              "settings": settings}
    result_path.write_text(json.dumps(result, indent=2))
    for key, rates in (("learned", learned), *references.items()):
        print(f"  {key:8}{fmt_rates(rates)}", flush=True)
    return result


def columns(results):
    """The summary columns of a result: v1's attributes and joint, or v2's two axes and their parts."""
    return V2_COLUMNS if "reconstruction" in results[0]["learned"] else ATTRIBUTES + ("joint",)


V2_COLUMNS = ("reconstruction", "editability", "identity_under_edits", "edits_obeyed")


def fmt_rates(r):
    keys = V2_COLUMNS if "reconstruction" in r else ATTRIBUTES + ("joint",)
    return "  ".join(f"{k} {r[k]:.2f}" for k in keys)


def headlines(results):
    """The columns whose worst concept is reported: v1's joint, v2's two axes."""
    return V2_COLUMNS[:2] if columns(results) == V2_COLUMNS else ("joint",)


def markdown(results, opt, summary):
    def pct(x):
        return f"{100 * x:.0f}%"
    cols = columns(results)
    head = "| concept | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)
    lines = [f"Recipe: `{' '.join(opt.recipe)}`" + (f" + `{' '.join(opt.overrides)}`" if opt.overrides else ""),
             f"training steps: {opt.max_steps or 'the recipe’s'}, seed {opt.seed}; sampling {opt.n_samples} per "
             f"prompt, DDIM {opt.ddim_steps}, guidance {opt.scale}, seed {opt.sample_seed}", ""]
    titles = (("learned", "`a photo of *`"), ("init", "`a photo of a <shape>` (the init word)"))
    if cols == V2_COLUMNS:
        titles = (("learned", "`*`"), ("init", "the init word (`a <word>` in place of `*`)"),
                  ("human", "human captions (the words that fit the identity, `ldm.data.shapes_v2.Concept."
                            "human_caption`, in place of `*`)"))
        lines += ["Edits: " + ", ".join(f"`{t}`" for t, _ in EDITS), ""]
    for key, title in titles:
        if key not in summary:
            continue
        lines += [title, "", head]
        for r in results:
            lines.append(f"| {r['concept']} | " + " | ".join(pct(r[key][a]) for a in cols) + " |")
        mean = summary[key]["mean"]
        lines.append("| **mean** | " + " | ".join(f"**{pct(mean[a])}**" for a in cols) + " |")
        lines.append("")
    worst = summary["learned"]["worst"]
    if "concept" in worst:  # v1: one headline
        lines.append(f"Worst concept (learned word): {worst['concept']} at {pct(worst['joint'])} joint.")
    for column, one in ({} if "concept" in worst else worst).items():
        lines.append(f"Worst concept (learned word, {column}): {one['concept']} at {pct(one[column])}.")
    return "\n".join(lines) + "\n"


def summarise(results):
    summary = {}
    for key in ("learned", "init", "human"):
        if not all(key in r for r in results):  # results of an older version lack "human"
            continue
        mean = {a: sum(r[key][a] for r in results) / len(results) for a in columns(results)}
        worst = {}
        for column in headlines(results):
            r = min(results, key=lambda r: r[key][column])
            worst[column] = {"concept": r["concept"], column: r[key][column]}
        # v1 keeps its one {"concept", "joint"}; v2 has one per axis
        summary[key] = {"mean": mean, "worst": worst["joint"] if "joint" in worst else worst}
    return summary


def write_figures(results, outdir, n_samples=6, scale=2):
    """curves.png: every concept's joint rate vs step; grid.png: per concept, its images | init word | learned."""
    from PIL import Image, ImageDraw
    from ldm.data.personalized import list_images
    from evaluation.learning_curves import plot_curves
    from ldm.util import load_font
    curves = {r["concept"]: [(h["step"], h["joint"]) for h in r["curve"]] for r in results if r["curve"]}
    if curves:
        plot_curves(curves, outdir / "curves.png", title="joint match rate of 'a photo of *' during training "
                    "(v2: its identity)",
                    y_label="joint rate", y_range=(0, 1), size=(980, 460))
    cell, label_width, gap = 32 * scale + 2, 250, 12
    width = label_width + (5 + 2 * n_samples) * cell + 2 * gap
    grid = Image.new("RGB", (width, 24 + len(results) * cell), (40, 40, 40))
    draw, font = ImageDraw.Draw(grid), load_font(13)
    for x, title in ((label_width, "concept images"), (label_width + 5 * cell + gap, "a photo of a <shape>"),
                     (label_width + (5 + n_samples) * cell + 2 * gap, "a photo of *")):
        draw.text((x, 5), title, fill="white", font=font)
    for i, r in enumerate(results):
        y = 24 + i * cell
        draw.text((6, y + cell // 2), r["concept"], fill="white", font=font, anchor="lm")
        tiles = [Image.open(p).convert("RGB") for p in list_images(r["data_root"])[:5]]
        for key in ("init_word", "learned"):
            row = Image.open(outdir / r["concept"] / f"{key}.png").convert("RGB")
            pitch, pad = 32 + ROW_PADDING, ROW_PADDING
            tiles += [row.crop((k * pitch + pad, pad, k * pitch + pad + 32, pad + 32)) for k in range(n_samples)]
        for k, tile in enumerate(tiles):
            x = label_width + k * cell + gap * ((k >= 5) + (k >= 5 + n_samples))
            grid.paste(tile.resize((32 * scale, 32 * scale), Image.Resampling.NEAREST), (x, y))
    grid.save(outdir / "grid.png")


def main(argv=None):
    opt = parse_args(argv)
    from ldm.checkpoint import load_model_from_config
    if opt.world == "v2":
        from ldm.data.shapes_v2 import get_concepts
    else:
        from ldm.data.shapes import get_concepts
    try:
        concepts = get_concepts(opt.concepts)
    except ValueError as error:
        raise SystemExit(f"--concepts: {error}")
    outdir = ROOT / opt.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    done = {c.name: previous_result(opt, c, outdir) for c in concepts}  # refuse mixed settings before any work
    results, model = [], None
    for concept in concepts:
        if done[concept.name]:
            print(f"{concept.name}: done before, {outdir / concept.name / 'result.json'}", flush=True)
            results.append(done[concept.name])
            continue
        model = model or load_model_from_config(str(ROOT / opt.inference_config), str(ROOT / opt.ckpt), verbose=False)
        results.append(benchmark_concept(opt, model, concept, outdir))
    summary = summarise(results)
    table = markdown(results, opt, summary)
    (outdir / "results.json").write_text(json.dumps({"settings": settings_of(opt), "summary": summary,
                                                     "concepts": results}, indent=2))
    (outdir / "results.md").write_text(table)
    write_figures(results, outdir)
    print("\n" + table)
    print(f"written: {outdir / 'results.md'}, {outdir / 'results.json'}, {outdir / 'curves.png'}; "
          f"{time.time() - start:.0f} s")
    return summary


if __name__ == "__main__":
    main()
