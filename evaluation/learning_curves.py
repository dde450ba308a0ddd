"""Learning curves of textual inversion: how well the learned word draws the concept, step by step.

`LearningCurve` is a Lightning callback (enable it under `lightning.callbacks` with
`target: evaluation.learning_curves.LearningCurve`; it lives beside the evaluators it applies, so that ldm/
never imports evaluation/). Every `every_n_steps` optimizer steps, and before the first and after the last, it
samples the prompt with the learned word (a fixed seed, a few samples, a few DDIM steps)
and scores the samples:

- toy shapes model: the toy evaluator's match rates (colour, shape, size, region and all of them) against
  `toy_target`, e.g. "magenta triangle large top", or "auto": what the training images all share; with
  `toy_world: v2`, world v2's evaluator (`evaluation/shapes_v2_eval.py`: hue, shape, pattern, size, row,
  column), e.g. "orange striped circle";
- a real model: the paper's CLIP similarities (image-image to the training images, text-image to the prompt
  without the placeholder) with the CLIP model in the local directory `clip_dir`;
- neither given: it says so in one line and does nothing.

The numbers go to the run's loggers (the CSV log: columns `curve/<metric>`), and a plot of score vs step
and the numbers themselves to <logdir>/images/learning_curve.png and .json, beside the image grids.
"""
import json
import math
import os

import torch
from PIL import Image, ImageDraw
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from evaluation import sample_images, shapes_eval, shapes_v2_eval
from evaluation.clip_eval import CLIPEvaluator, strip_placeholders
from evaluation.shapes_eval import LARGE_SIDE, MEDIUM_SIDES, QUADRANTS, SMALL_SIDE, analyse_image
from ldm.data.image_ops import load_rgb
from ldm.util import load_font

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (0, 0, 0), (100, 100, 255))


def _nice_step(span, n_ticks):
    """A round tick spacing (1, 2 or 5 times a power of ten) giving about n_ticks ticks over span."""
    raw = max(span, 1e-12) / n_ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _ticks(low, high, n_ticks):
    step = _nice_step(high - low, n_ticks)
    first = math.ceil(low / step - 1e-9) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)], step


def _label(value, step):
    return f"{value:.0f}" if step >= 1 else f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def plot_curves(series, path=None, title="", x_label="step", y_label="", y_range=None, size=(720, 420),
                highlight=None, x_range=None):
    """Draw {label: [(x, y), ...]} as lines with dots on one set of axes, with a legend; -> PIL image.

    Pure PIL (matplotlib is not a dependency). y_range defaults to the data's range; x_range to 0 .. the largest
    x. The series
    named `highlight` is drawn bolder, on top of the others.
    """
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        raise ValueError("plot_curves: nothing to plot (every series is empty)")
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_low, x_high = x_range if x_range else (0.0, max(max(xs), 1))
    y_low, y_high = y_range if y_range else (min(ys), max(ys))
    if y_high <= y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    font, small = load_font(15), load_font(12)
    width, height = size
    legend_width = min(260, 12 + 8 * max(len(k) for k in series) + 30)
    left, right, top, bottom = 60, width - legend_width - 10, 34, height - 46
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def to_px(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    y_ticks, y_step = _ticks(y_low, y_high, 5)
    for y in y_ticks:
        _, py = to_px(x_low, y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((left - 6, py), _label(y, y_step), fill="black", font=small, anchor="rm")
    x_ticks, x_step = _ticks(x_low, x_high, 6)
    for x in x_ticks:
        px, _ = to_px(x, y_low)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px, bottom + 6), _label(x, x_step), fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, 8), title, fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, height - 8), x_label, fill="black", font=small, anchor="mb")
    draw.text((6, top - 18), y_label, fill="black", font=small)
    order = sorted(enumerate(series.items()), key=lambda item: item[1][0] == highlight)
    for k, (label, points) in order:
        colour, line_width = PALETTE[k % len(PALETTE)], 3 if label == highlight else 2
        pixels = [to_px(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=line_width)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 8 + 18 * k
        draw.line([(right + 12, ly), (right + 32, ly)], fill=colour, width=line_width)
        draw.text((right + 38, ly), label, fill="black", font=small, anchor="lm")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
    return image


def _size_word(sides):
    if all(s >= LARGE_SIDE for s in sides):
        return "large"
    if all(MEDIUM_SIDES[0] <= s <= MEDIUM_SIDES[1] for s in sides):
        return "medium"
    if all(0 < s <= SMALL_SIDE for s in sides):
        return "small"
    return None


def toy_v2_target_of(images):
    """World v2's target words that all the images share: hue, pattern and shape where they agree, and a size, a row
    or a column (a centred one only with the other) shared by all."""
    analyses = [shapes_v2_eval.analyse_image(image) for image in images]
    shared = {key: analyses[0][key] for key in ("hue", "pattern", "shape", "size", "row", "column")
              if len({a[key] for a in analyses}) == 1 and analyses[0][key] != "none"}
    words = [shared[key] for key in ("hue", "pattern", "shape", "size") if key in shared]
    if shared.get("row") == shared.get("column") == "centre":
        words.append("centre")
    else:
        words += [shared[key] for key in ("row", "column") if shared.get(key, "centre") != "centre"]
    return " ".join(words)


def toy_target_of(images):
    """The toy target that all the images share ("magenta triangle large top"): one colour, one shape, one size
    class and the most specific region (a quadrant, else the centre, else a half) common to all, where they agree."""
    analyses = [analyse_image(image) for image in images]
    words = []
    for key in ("colour", "shape"):
        values = {a[key] for a in analyses}
        if len(values) == 1 and "none" not in values:
            words.append(values.pop())
    size = _size_word([a["side"] for a in analyses])
    if size:
        words.append(size)
    if all(a["region"] for a in analyses):
        for candidates in (QUADRANTS, ("centre",), ("top", "bottom", "left", "right")):
            shared = [r for r in candidates if all(a["region"][r] for a in analyses)]
            if shared:
                words.append(shared[0])
                break
    return " ".join(words)


class LearningCurve(Callback):
    """Scores samples of the learned word every `every_n_steps` steps (see the module docstring)."""

    def __init__(self, every_n_steps=100, n_samples=8, ddim_steps=10, scale=5.0, seed=0, prompt="a photo of {}",
                 toy_target=None, clip_dir=None, batch_size=16, filename="learning_curve", toy_world="v1"):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"LearningCurve: every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.sampling = dict(n_samples=n_samples, ddim_steps=ddim_steps, scale=scale, seed=seed, batch_size=batch_size)
        self.prompt_template = prompt
        self.toy_target = toy_target
        if toy_world not in ("v1", "v2"):
            raise ValueError(f"LearningCurve: toy_world must be v1 or v2, got {toy_world!r}")
        self.toy_world = toy_world
        self.clip_dir = clip_dir
        self.filename = filename
        self.history = []  # [{"step": int, metric: float, ...}], kept in the Lightning checkpoint
        self.enabled = False

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state_dict):
        self.history = list(state_dict.get("history", []))

    def setup(self, trainer, pl_module, stage):
        self.enabled = False
        manager = getattr(pl_module, "embedding_manager", None)
        if stage != "fit" or trainer.global_rank != 0:
            return
        if manager is None or not manager.concepts:
            rank_zero_info("LearningCurve: the model has no embedding manager; no learning curve.")
            return
        if not (self.toy_target or self.clip_dir):
            rank_zero_info("LearningCurve: neither toy_target nor clip_dir is set; no learning curve.")
            return
        self.placeholder = manager.concepts[0]
        self.prompt = self.prompt_template.format(self.placeholder)
        self.concept_images = [load_rgb(p) for p in self._training_image_paths(trainer)]
        if not self.concept_images and (self.toy_target == "auto" or not self.toy_target):
            rank_zero_info("LearningCurve: the training dataset lists no image files to compare with; "
                           "no learning curve.")
            return
        if self.toy_target:
            parse_target = self.evaluator().parse_target
            auto = toy_v2_target_of if self.toy_world == "v2" else toy_target_of
            text = auto(self.concept_images) if self.toy_target == "auto" else self.toy_target
            if not text:
                rank_zero_info("LearningCurve: the training images share no colour, shape, size or region "
                               "(toy_target: auto); no learning curve.")
                return
            self.target_text, self.target = text, parse_target(text)
        else:
            self.clip = None  # built at the first point, once the model is on its device
            self.target_text = f"CLIP ({os.path.basename(os.path.normpath(self.clip_dir))})"
        self.enabled = True
        rank_zero_info(f"LearningCurve: every {self.every_n_steps} steps, {self.sampling['n_samples']} samples of "
                       f"{self.prompt!r} scored against {self.target_text}")

    def evaluator(self):
        """The toy world's evaluator module (both have parse_target and evaluate_images)."""
        return shapes_v2_eval if self.toy_world == "v2" else shapes_eval

    @staticmethod
    def _training_image_paths(trainer):
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
        dataset = getattr(dataset, "data", dataset)  # WrappedDataset
        return list(getattr(dataset, "image_paths", []))

    def score(self, images, device):
        if self.toy_target:
            result = self.evaluator().evaluate_images(list(images), self.target)
            return {"joint": result["joint"], **result["rates"]}
        self.clip = self.clip or CLIPEvaluator(self.clip_dir, device=device)
        return {"clip_img": self.clip.img_to_img_similarity(self.concept_images, images),
                "clip_txt": self.clip.txt_to_img_similarity(strip_placeholders(self.prompt, [self.placeholder]),
                                                            images)}

    def measure(self, trainer, pl_module):
        step = trainer.global_step
        if not self.enabled or any(h["step"] == step for h in self.history):
            return
        was_training = pl_module.training
        pl_module.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # training draws the same with or without curves
            images = sample_images(pl_module, self.prompt, **self.sampling)
        if was_training:
            pl_module.train()
        scores = self.score(images, pl_module.device)
        self.history.append({"step": step, **scores})
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in scores.items()}, step=step)
        self.save(trainer)

    def save(self, trainer):
        logger = trainer.logger
        folder = os.path.join(logger.save_dir if logger is not None else trainer.default_root_dir, "images")
        os.makedirs(folder, exist_ok=True)
        series = {k: [(h["step"], h[k]) for h in self.history] for k in self.history[0] if k != "step"}
        y_range = (0.0, 1.0) if self.toy_target else None
        plot_curves(series, os.path.join(folder, f"{self.filename}.png"), y_range=y_range, highlight="joint",
                    title=f"{self.prompt!r} vs {self.target_text}", y_label="match rate" if self.toy_target else
                    "cosine similarity")
        with open(os.path.join(folder, f"{self.filename}.json"), "w") as f:
            json.dump({"prompt": self.prompt, "target": self.target_text, "sampling": self.sampling,
                       "history": self.history}, f, indent=2)

    def on_train_start(self, trainer, pl_module):
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.measure(trainer, pl_module)
