"""Evaluate a learned concept: generate samples for a prompt, then score them.

Metrics:
- the paper's CLIP similarities (--clip_dir, a local CLIP model folder): image similarity to the
  concept's training images (--data_dir) and text similarity to the prompt without its placeholder;
- the toy shapes world's exact attribute match rates (--toy_target "magenta triangle large top"; with
  --toy_world v2, world v2's words: "orange striped diamond small top-left").

Either sample from a model (--config, --ckpt, --embedding_path) or score a folder of existing
images (--images_dir). Samples go to OUTDIR/<prompt>/samples/NNNNN.png; --json writes the numbers.

Example (the toy demo):
    python scripts/evaluate_model.py --config configs/toy/txt2img-shapes-inference.yaml --ckpt models/toy/shapes-ldm.safetensors \\
        --embedding_path logs/<run>/checkpoints/embeddings.pt --data_dir data/toy_concept \\
        --prompt "a photo of *" --toy_target "magenta triangle large top"
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from evaluation import sample_images  # noqa: E402
from evaluation import shapes_eval, shapes_v2_eval  # noqa: E402
from ldm.cli_checks import checked_parser, run_cli  # noqa: E402
from ldm.data.image_ops import load_rgb  # noqa: E402
from ldm.data.personalized import list_images  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=str, default="a photo of *", help="the prompt to render (with the placeholder)")
    p.add_argument("--config", type=str, default="configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml",
                   help="the model's YAML config")
    p.add_argument("--trust_config", action="store_true",
                   help="allow --config to name targets outside this project's modules (configs are code)")
    p.add_argument("--ckpt", "--ckpt_path", dest="ckpt", type=str, help="the model checkpoint (.ckpt or .safetensors)")
    p.add_argument("--embedding_path", type=str, nargs="+", help="learned embedding file(s)")
    p.add_argument("--placeholder_string", type=str, nargs="+",
                   help="placeholder strings for the loaded embeddings, one per file (default: the files' own)")
    p.add_argument("--data_dir", type=str, help="the concept's training images (reference for image similarity)")
    p.add_argument("--images_dir", type=str, help="score the images in this folder instead of sampling a model")
    p.add_argument("--n_samples", type=int, default=64, help="how many images to generate")
    p.add_argument("--batch_size", type=int, default=8, help="images per sampling batch")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--outdir", "--out_dir", dest="outdir", type=str, default="outputs/evaluation",
                   help="samples go to OUTDIR/<prompt>/samples")
    p.add_argument("--clip_dir", type=str, help="local transformers CLIP model folder: report CLIP similarities")
    p.add_argument("--toy_target", type=str,
                   help='toy shapes target, e.g. "magenta triangle large top": report attribute match rates')
    p.add_argument("--toy_world", choices=("v1", "v2"), default="v1",
                   help="which toy world's evaluator reads --toy_target: v1 (layouts) or v2 (identity and edits)")
    p.add_argument("--json", type=str, help="also write the results to this JSON file")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_options(opt):
    if not (opt.clip_dir or opt.toy_target):
        raise SystemExit("Nothing to measure: pass --clip_dir (CLIP similarities) and/or --toy_target (toy shapes).")
    if opt.images_dir is None and opt.ckpt is None:
        raise SystemExit("Pass --ckpt (with --config) to sample a model, or --images_dir to score existing images.")
    for flag in ("config", "ckpt"):
        path = getattr(opt, flag)
        if opt.images_dir is None and not os.path.isfile(path):
            raise SystemExit(f"--{flag} file not found: {path}")
    for path in opt.embedding_path or []:
        if not os.path.isfile(path):
            raise SystemExit(f"--embedding_path file not found: {path}")
    for flag in ("data_dir", "images_dir", "clip_dir"):
        path = getattr(opt, flag)
        if path is not None and not os.path.isdir(path):
            raise SystemExit(f"--{flag} folder not found: {path}")
    if not opt.toy_target:
        return None
    try:
        return toy_evaluator(opt).parse_target(opt.toy_target)
    except ValueError as err:
        raise SystemExit(f"--toy_target: {err}") from err


def toy_evaluator(opt):
    return shapes_v2_eval if opt.toy_world == "v2" else shapes_eval


def generate(opt):
    """Sample the model and save the images; returns them ((n, 3, H, W) in [-1, 1]) and the placeholders."""
    from ldm.checkpoint import load_model_from_config
    from ldm.config_trust import load_trusted_config
    from ldm.models.diffusion.textual_inversion import EmbeddingLoadError, load_embeddings
    from ldm.txt2img_common import prompt_to_filename
    from ldm.util import to_pil

    model = load_model_from_config(load_trusted_config(opt.config, opt.trust_config), opt.ckpt, device=opt.device, verbose=False)
    if opt.embedding_path:
        try:
            load_embeddings(model, opt.embedding_path, opt.placeholder_string, opt.config)
        except EmbeddingLoadError as err:
            raise SystemExit(str(err)) from err
    images = sample_images(model, opt.prompt, opt.n_samples, ddim_steps=opt.ddim_steps, scale=opt.scale,
                           eta=opt.ddim_eta, batch_size=opt.batch_size, seed=opt.seed)
    folder = os.path.join(opt.outdir, prompt_to_filename(opt.prompt, "prompt"), "samples")
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        to_pil(image).save(os.path.join(folder, f"{k:05}.png"))
    print(f"Wrote {len(images)} samples to {folder}")
    manager = getattr(model, "embedding_manager", None)
    return images, list(manager.string_to_param_dict) if manager is not None else []


def measure(opt, target, images, references, placeholders):
    """{"generated": metrics, "reference": metrics of the concept images} for the requested metrics."""
    results = {"generated": {}, "reference": {}}
    if opt.clip_dir:
        from evaluation.clip_eval import CLIPEvaluator, strip_placeholders
        evaluator = CLIPEvaluator(opt.clip_dir, device=opt.device)
        text = strip_placeholders(opt.prompt, placeholders)
        if references:
            results["generated"]["clip_img_similarity"] = evaluator.img_to_img_similarity(references, images)
        results["generated"]["clip_txt_similarity"] = evaluator.txt_to_img_similarity(text, images)
        if references:
            results["reference"]["clip_txt_similarity"] = evaluator.txt_to_img_similarity(text, references)
    if target:
        for name, batch in (("generated", images), ("reference", references)):
            if batch:
                scores = toy_evaluator(opt).evaluate_images(batch, target)
                results[name].update({f"toy_{k}": v for k, v in scores["rates"].items()})
                results[name]["toy_joint"] = scores["joint"]
    return {name: metrics for name, metrics in results.items() if metrics}


def format_table(results):
    metrics = sorted({m for row in results.values() for m in row})
    width = max(len(m) for m in metrics)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{name:>10}" for name in results)]
    for metric in metrics:
        cells = [f"{row[metric]:>10.4f}" if metric in row else f"{'-':>10}" for row in results.values()]
        lines.append(f"{metric:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    opt = checked_parser(build_parser()).parse_args(argv)
    target = check_options(opt)
    torch.manual_seed(opt.seed)
    references = [load_rgb(p) for p in list_images(opt.data_dir)] if opt.data_dir else []
    if opt.images_dir:
        images = [load_rgb(p) for p in list_images(opt.images_dir)]
        placeholders = opt.placeholder_string or ["*"]
    else:
        samples, placeholders = generate(opt)
        images = list(samples)
    results = measure(opt, target, images, references, placeholders or ["*"])
    print(f"prompt: {opt.prompt!r}, {len(images)} images" + (f", target: {target}" if target else ""))
    print(format_table(results))
    report = {"prompt": opt.prompt, "n_images": len(images), "toy_target": target, **results}
    if opt.json:
        os.makedirs(os.path.dirname(os.path.abspath(opt.json)), exist_ok=True)
        with open(opt.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    run_cli(main)
