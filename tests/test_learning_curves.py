"""Learning curves (evaluation.learning_curves): the PIL plot, the toy target of a concept, and real main.py runs."""
import csv
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as entry
from ldm.data.personalized import list_images
from ldm.data.shapes import CONCEPTS
from evaluation.learning_curves import PALETTE, plot_curves, toy_target_of

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny/finetune-tiny.yaml")
CURVE = "lightning.callbacks.learning_curve"


def _colour_pixels(image, colour):
    return np.argwhere(np.all(np.asarray(image.convert("RGB")) == colour, axis=-1))


def test_plot_draws_its_input():
    rising = plot_curves({"joint": [(0, 0.0), (50, 0.5), (100, 1.0)]}, y_range=(0, 1), title="t")
    falling = plot_curves({"joint": [(0, 1.0), (50, 0.5), (100, 0.0)]}, y_range=(0, 1), title="t")
    assert rising.size == falling.size and not np.array_equal(np.asarray(rising), np.asarray(falling))
    # the line goes up to the right: its rightmost pixels are higher (smaller row) than its leftmost
    for image, rises in ((rising, True), (falling, False)):
        pixels = _colour_pixels(image, PALETTE[0])
        pixels = pixels[pixels[:, 1] < image.size[0] - 300]  # the plot area, not the legend
        left = pixels[pixels[:, 1] <= pixels[:, 1].min() + 3][:, 0].mean()
        right = pixels[pixels[:, 1] >= pixels[:, 1].max() - 3][:, 0].mean()
        assert (right < left - 100) == rises
    two = plot_curves({"a": [(0, 0.2), (10, 0.4)], "b": [(0, 0.9), (10, 0.1)]})
    assert len(_colour_pixels(two, PALETTE[1])) > 0  # a second series, in the second colour
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves({"a": []})


def test_toy_target_of_each_benchmark_concept_is_its_target():
    for concept in CONCEPTS:
        images = [Image.open(p) for p in list_images(str(ROOT / "data/concepts" / concept.name))]
        assert toy_target_of(images) == concept.target
    top, bottom = CONCEPTS[0], CONCEPTS[2]  # large magenta triangles at the top, medium green squares below
    mixed = [Image.open(p) for c in (top, bottom) for p in list_images(str(ROOT / "data/concepts" / c.name))]
    assert toy_target_of(mixed) == ""  # nothing in common


def _run(tmp_path, concept_dir, tiny_ckpt, *overrides, steps=4):
    logs = tmp_path / "logs"
    entry.main(["--base", CONFIG, "-t", "--actual_resume", str(tiny_ckpt), "--data_root", str(concept_dir),
                "--init_word", "triangle", "-l", str(logs), "--max_steps", str(steps),
                "lightning.callbacks.image_logger.params.batch_frequency=2",
                f"{CURVE}.target=evaluation.learning_curves.LearningCurve", f"{CURVE}.params.every_n_steps=2",
                f"{CURVE}.params.n_samples=2", f"{CURVE}.params.ddim_steps=2", *overrides])
    (run,) = glob.glob(os.path.join(str(logs), "*"))
    rows = []  # no CSV at all when nothing was logged
    for metrics in glob.glob(os.path.join(run, "csv", "*", "metrics.csv")):
        with open(metrics) as f:
            rows += list(csv.DictReader(f))
    return Path(run), rows


def test_training_logs_toy_curve_beside_the_image_grids(tmp_path, concept_dir, tiny_ckpt):
    run, rows = _run(tmp_path, concept_dir, tiny_ckpt, f"{CURVE}.params.toy_target=magenta triangle top")
    curve = [r for r in rows if r.get("curve/joint")]
    assert [int(r["step"]) for r in curve] == [0, 2, 4]
    assert all(0.0 <= float(r[f"curve/{k}"]) <= 1.0 for r in curve for k in ("joint", "colour", "shape", "region"))
    images = run / "images"
    assert list((images / "train").glob("*.jpg"))  # the grids the plot sits beside
    with Image.open(images / "learning_curve.png") as plot:
        assert plot.size[0] > 200 and len(np.unique(np.asarray(plot.convert("L")))) > 2
    record = json.loads((images / "learning_curve.json").read_text())
    assert record["prompt"] == "a photo of *" and record["target"] == "magenta triangle top"
    assert [h["step"] for h in record["history"]] == [0, 2, 4]
    assert record["history"][-1]["joint"] == pytest.approx(float(curve[-1]["curve/joint"]))
    # resumed, the run keeps its curve (the history travels in the checkpoint) and goes on from there
    entry.main(["-r", str(run), "-t", "--max_steps", "6"])
    record = json.loads((images / "learning_curve.json").read_text())
    assert [h["step"] for h in record["history"]] == [0, 2, 4, 6]


def test_training_logs_clip_curve(tmp_path, concept_dir, tiny_ckpt, tiny_clip_dir):
    _, rows = _run(tmp_path, concept_dir, tiny_ckpt, f"{CURVE}.params.clip_dir={tiny_clip_dir}", steps=2)
    curve = [r for r in rows if r.get("curve/clip_img")]
    assert [int(r["step"]) for r in curve] == [0, 2]
    assert all(-1.0 <= float(r["curve/clip_img"]) <= 1.0 and -1.0 <= float(r["curve/clip_txt"]) <= 1.0
               for r in curve)


def test_without_a_scorer_it_says_so_and_does_nothing(tmp_path, concept_dir, tiny_ckpt, caplog):
    run, rows = _run(tmp_path, concept_dir, tiny_ckpt, steps=1)
    assert "neither toy_target nor clip_dir" in caplog.text
    assert not any(k.startswith("curve/") for r in rows for k in r if r[k])
    assert not (run / "images" / "learning_curve.png").exists()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP model saved like a hub snapshot."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, max_position_embeddings=77, vocab_size=49408),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_curves_do_not_change_what_training_learns(tmp_path, concept_dir, tiny_ckpt):
    import torch
    learned = []
    for name, extra in (("with", [f"{CURVE}.params.toy_target=magenta triangle"]),
                        ("without", [])):  # no scorer: the callback stays idle
        run, _ = _run(tmp_path / name, concept_dir, tiny_ckpt, *extra, steps=3)
        learned.append(torch.load(run / "checkpoints/embeddings.pt", weights_only=True)["string_to_param"]["*"])
    assert torch.equal(*learned)
