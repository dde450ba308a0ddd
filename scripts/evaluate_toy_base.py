"""How well the toy model draws what it is told: "a photo of a {colour} {shape}" for all 24 combinations (or 12).

    python scripts/evaluate_toy_base.py --ckpt models/toy/shapes-ldm.safetensors --n_samples 64
    python scripts/evaluate_toy_base.py --sampler dpmpp_2m_karras --ddim_steps 20
    python scripts/evaluate_toy_base.py --world v2 --ckpt models/toy/shapes-v2-ldm.safetensors

Prints, per combination, the fraction of samples whose colour, shape and both are read back by the toy
evaluator, and the averages over all combinations (DESIGN.md's bar: >= 90% for colour and shape together).

World v2 (`ldm/data/shapes_v2.py`): each of the 36 prompts (6 colours x 6 shapes) names a size, a fill pattern,
a colour, a shape and a position ("a photo of a small striped red diamond in the top left"; sizes alternate,
patterns and positions cycle through the shape's patterns, the grid's cells and the phrases that name one axis),
and the v2 evaluator reads colour, shape, pattern, size and position (every named axis right) back; "all" is
every named attribute right (issue 16's bars: >= 90% colour and shape, >= 80% position and size).

`--world v2 --between` asks for the six unnamed hues instead, in the same 36 prompts: the colour word is the
placeholder "*", embedded as the mean of the two colour words beside the hue (ldm.data.shapes_v2.HUE_BLENDS, the
point the stage-3 captions taught). It measures whether any embedding reaches each in-between hue, which a learned
word needs before it can keep one.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation import sample_images  # noqa: E402
from evaluation import shapes_v2_eval  # noqa: E402
from evaluation.shapes_eval import evaluate_images  # noqa: E402
from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.cli_checks import run_cli  # noqa: E402
from ldm.config_trust import load_trusted_config  # noqa: E402
from ldm.data.shapes import COLOURS, SHAPES  # noqa: E402
from ldm.data import shapes_v2  # noqa: E402
from ldm.models.diffusion.generate import SAMPLERS  # noqa: E402
from ldm.modules.encoders.modules import mean_of_words  # noqa: E402


# The v2 prompts' positions: every cell of the 3x3 grid, a corner's row or column alone where one is None.
V2_CELLS = (("top", "left"), ("top", None), ("top", "right"), (None, "left"), ("centre", "centre"),
            (None, "right"), ("bottom", "left"), ("bottom", None), ("bottom", "right"))
DEFAULTS = {"v1": ("configs/toy/txt2img-shapes-inference.yaml", "models/toy/shapes-ldm.safetensors"),
            "v2": ("configs/toy/txt2img-shapes-v2-inference.yaml", "models/toy/shapes-v2-ldm.safetensors")}
V2_KEYS = ("colour", "shape", "pattern", "size", "position", "all")


def v2_prompts(half=False, between=False):
    """(prompt, target, seed offset) triples: the 36 colour-shape combinations (18 with half), each with a size,
    a fill pattern and a position; with between, the unnamed hues in place of the colours, written "*"."""
    triples = []
    for ci, colour in enumerate(shapes_v2.UNNAMED_HUES if between else COLOURS):
        for si, shape in enumerate(shapes_v2.SHAPES):
            if half and (ci + si) % 2:
                continue
            k = len(shapes_v2.SHAPES) * ci + si
            size, (row, column) = ("small", "large")[(ci // 3 + si) % 2], V2_CELLS[k % len(V2_CELLS)]
            patterns = shapes_v2.patterns_for(shape)
            pattern = patterns[(ci + si // 2) % len(patterns)]
            target = {"hue": colour, "shape": shape, "pattern": pattern, "size": size}
            target.update({key: value for key, value in (("row", row), ("column", column)) if value})
            word = "*" if between else colour
            triples.append((f"a photo of a {size} {shapes_v2.PATTERN_WORDS[pattern]} {word} {shape} "
                            f"{shapes_v2.position_phrase(row, column)}", target, 100 * ci + si))
    return triples


def evaluate_v2(model, n_samples, ddim_steps, scale, seed, batch_size=64, sampler="ddim", half=False,
                between=False):
    rows = []
    for prompt, target, offset in v2_prompts(half, between):
        if between:
            encoder, words = model.cond_stage_model, shapes_v2.HUE_BLENDS[target["hue"]][1]
            vector = mean_of_words(encoder.token_embedding, [encoder.string_to_token_ids(w) for w in words])
            model.embedding_manager.string_to_param_dict["*"].data.copy_(vector[None])  # as train_blends embeds it
        images = sample_images(model, prompt, n_samples, ddim_steps=ddim_steps, scale=scale,
                               batch_size=batch_size, seed=seed + offset, sampler=sampler)
        scores = shapes_v2_eval.evaluate_images(list(images), target)
        position = [all(a[key] == target[key] for key in ("row", "column") if key in target)
                    for a in scores["analyses"]]
        rates = scores["rates"]
        rows.append({"prompt": prompt, "colour": rates["hue"], "shape": rates["shape"], "pattern": rates["pattern"],
                     "size": rates["size"], "position": sum(position) / len(position), "all": scores["joint"]})
        print(f"{prompt:62} " + "  ".join(f"{k} {rows[-1][k]:.2f}" for k in V2_KEYS), flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in V2_KEYS}
    return rows, mean


def evaluate(model, n_samples, ddim_steps, scale, seed, batch_size=64, sampler="ddim", half=False):
    rows = []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            if half and (ci + si) % 2:
                continue
            prompt = f"a photo of a {colour} {shape}"
            images = sample_images(model, prompt, n_samples, ddim_steps=ddim_steps, scale=scale,
                                   batch_size=batch_size, seed=seed + 100 * ci + si, sampler=sampler)
            scores = evaluate_images(list(images), {"colour": colour, "shape": shape})
            rows.append({"prompt": prompt, **scores["rates"], "both": scores["joint"]})
            print(f"{prompt:36} colour {rows[-1]['colour']:.2f}  shape {rows[-1]['shape']:.2f}  "
                  f"both {rows[-1]['both']:.2f}", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("colour", "shape", "both")}
    return rows, mean


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", choices=sorted(DEFAULTS), default="v1",
                   help="v1: colour and shape prompts; v2: colour, shape, size and position (ldm/data/shapes_v2.py)")
    p.add_argument("--config", default=None, help="the inference config (default: the world's shipped one)")
    p.add_argument("--trust_config", action="store_true",
                   help="allow --config to name targets outside this project's modules (configs are code)")
    p.add_argument("--ckpt", default=None, help="the model's weights (default: the world's shipped model)")
    p.add_argument("--n_samples", type=int, default=64)
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the sampling method (docs/samplers.md)")
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--half", action="store_true",
                   help="only the 12 combinations whose colour and shape indices sum to an even number (every "
                        "colour twice, every shape three times; each with the seed it has in a full run)")
    p.add_argument("--between", action="store_true",
                   help="world v2: ask for the unnamed hues, each as the mean of its two neighbouring colour words")
    p.add_argument("--json", default=None, help="write the per-prompt rates and the means here")
    opt = p.parse_args(argv)
    if opt.between and opt.world != "v2":
        raise SystemExit("--between asks for world v2's unnamed hues: add --world v2")
    opt.config = opt.config or DEFAULTS[opt.world][0]
    opt.ckpt = opt.ckpt or DEFAULTS[opt.world][1]
    for path in (opt.config, opt.ckpt):
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found")
    start = time.time()
    model = load_model_from_config(load_trusted_config(opt.config, opt.trust_config), opt.ckpt, verbose=False)
    with torch.no_grad():
        if opt.world == "v2":
            rows, mean = evaluate_v2(model, opt.n_samples, opt.ddim_steps, opt.scale, opt.seed, sampler=opt.sampler,
                                     half=opt.half, between=opt.between)
        else:
            rows, mean = evaluate(model, opt.n_samples, opt.ddim_steps, opt.scale, opt.seed, sampler=opt.sampler,
                                  half=opt.half)
    print(f"\nmean over {len(rows)} prompts x {opt.n_samples} samples (scale {opt.scale}, {opt.sampler} "
          f"{opt.ddim_steps} steps, seed {opt.seed}): " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items())
          + f"   [{time.time() - start:.0f} s]")
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump({"settings": vars(opt), "mean": mean, "prompts": rows}, f, indent=2)
    return mean


if __name__ == "__main__":
    run_cli(main)
