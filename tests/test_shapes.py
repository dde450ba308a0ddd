"""The toy shapes world: generator spec and determinism, demo concept, and the evaluator's accuracy."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from evaluation.shapes_eval import analyse_image, evaluate_images, parse_target
from ldm.data.image_ops import to_uint8_hwc
from ldm.data.personalized import imagenet_templates_small
from ldm.data.shapes import (COLOURS, SHAPES, ShapeSpec, ShapesDataset, cross_thickness, random_spec, render,
                             shape_mask, write_concept)

ROOT = Path(__file__).resolve().parents[1]


def _generator_images(n, seed):
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    return specs, [render(s) for s in specs]


def test_dataset_is_deterministic_per_index_and_split():
    a, b = ShapesDataset(length=50, seed=3), ShapesDataset(length=50, seed=3)
    for i in (0, 17, 49, 17):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
    other_seed, val = ShapesDataset(length=50, seed=4), ShapesDataset(length=50, seed=3, set="validation")
    assert any(not np.array_equal(a[i]["image"], other_seed[i]["image"]) for i in range(5))
    assert any(not np.array_equal(a[i]["image"], val[i]["image"]) for i in range(5))
    with pytest.raises(IndexError):
        a[50]


def test_dataset_images_follow_the_spec():
    ds = ShapesDataset(length=300, seed=0)
    for i in range(len(ds)):
        spec, _ = ds.spec_and_caption(i)
        example = ds[i]
        image = to_uint8_hwc(example["image"])
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.float32
        # Crisp: the background and the shape's exact palette colour, no blended edge pixels.
        assert {tuple(p) for p in image.reshape(-1, 3).tolist()} == {(0, 0, 0), COLOURS[spec.colour]}
        rows, cols = np.nonzero(image.max(axis=-1))
        # The box is exactly side x side, inside the frame, at (x0, y0).
        assert 10 <= spec.side <= 22
        assert (rows.min(), cols.min()) == (spec.y0, spec.x0)
        assert rows.max() - rows.min() + 1 == spec.side and cols.max() - cols.min() + 1 == spec.side
        assert rows.max() < 32 and cols.max() < 32


def test_dataset_covers_every_shape_colour_and_side():
    ds = ShapesDataset(length=600, seed=1)
    specs = [ds.spec_and_caption(i)[0] for i in range(len(ds))]
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.colour for s in specs} == set(COLOURS)
    assert {s.side for s in specs} == set(range(10, 23))


def test_captions():
    ds = ShapesDataset(length=1000, seed=0, empty_caption_prob=0.1, shape_only_prob=0.2)
    kinds = {"empty": 0, "shape": 0, "both": 0}
    for i in range(len(ds)):
        spec, caption = ds.spec_and_caption(i)
        if caption == "":
            kinds["empty"] += 1
        elif caption in [t.format(spec.shape) for t in imagenet_templates_small]:
            kinds["shape"] += 1
        else:
            assert caption in [t.format(f"{spec.colour} {spec.shape}") for t in imagenet_templates_small]
            kinds["both"] += 1
        assert not {"top", "bottom", "left", "right"} & set(caption.split())
        assert not any(ch.isdigit() for ch in caption)
    assert 60 <= kinds["empty"] <= 140 and 150 <= kinds["shape"] <= 250 and kinds["both"] >= 600


def test_triangle_points_up_and_is_symmetric():
    for side in range(10, 23):
        mask = shape_mask("triangle", side)
        widths = mask.sum(axis=1)
        assert widths[0] <= 2 and widths[-1] == side
        assert np.all(np.diff(widths) >= 0)
        np.testing.assert_array_equal(mask, mask[:, ::-1])


def test_other_shapes_geometry():
    for side in range(10, 23):
        assert shape_mask("square", side).all()
        circle = shape_mask("circle", side)
        assert circle.any(axis=0).all() and circle.any(axis=1).all()  # touches all four box edges
        assert not circle[0, 0] and abs(circle.mean() - np.pi / 4) < 0.06
        cross = shape_mask("cross", side)
        t = cross_thickness(side)
        assert abs(t - side / 3) <= 1 and (side - t) % 2 == 0
        np.testing.assert_array_equal(cross, cross.T)
        np.testing.assert_array_equal(cross, cross[::-1, ::-1])
        assert cross[0].sum() == t and cross[side // 2].sum() == side


def test_render_rejects_a_shape_outside_the_frame():
    with pytest.raises(ValueError):
        render(ShapeSpec("square", "red", 20, 15, 0))


def test_dataset_size_option_keeps_images_crisp():
    example = ShapesDataset(size=64, length=3)[0]
    image = to_uint8_hwc(example["image"])
    assert image.shape == (64, 64, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) == 2


def test_evaluator_reads_generator_images_exactly():
    specs, images = _generator_images(500, seed=123)
    analyses = [analyse_image(image) for image in images]
    shape_acc = np.mean([a["shape"] == s.shape for a, s in zip(analyses, specs)])
    colour_acc = np.mean([a["colour"] == s.colour for a, s in zip(analyses, specs)])
    assert shape_acc >= 0.99 and colour_acc >= 0.99
    assert all(a["side"] == s.side for a, s in zip(analyses, specs))
    for a, s in zip(analyses, specs):
        assert a["region"]["top"] == (s.y0 + s.side / 2 < 16)


def test_evaluator_survives_blur_noise_dimming_and_resizing():
    specs, images = _generator_images(200, seed=7)
    rng = np.random.default_rng(0)
    degraded = []
    for image in images:
        big = Image.fromarray(image).resize((64, 64), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
        pixels = np.asarray(big, dtype=np.float64) * rng.uniform(0.75, 1.0) + rng.normal(0, 10, (64, 64, 3))
        pixels[rng.integers(64), rng.integers(64)] = 255  # a stray bright speck
        degraded.append(np.clip(pixels, 0, 255).astype(np.uint8))
    analyses = [analyse_image(image) for image in degraded]
    assert np.mean([a["shape"] == s.shape for a, s in zip(analyses, specs)]) >= 0.95
    assert np.mean([a["colour"] == s.colour for a, s in zip(analyses, specs)]) >= 0.99
    assert np.mean([abs(a["side"] - s.side) <= 1 for a, s in zip(analyses, specs)]) >= 0.95


def test_evaluator_accepts_model_tensors_and_blank_images():
    _, images = _generator_images(4, seed=1)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    from_tensors = [analyse_image(x) for x in batch]
    assert [a["shape"] for a in from_tensors] == [analyse_image(x)["shape"] for x in images]
    blank = analyse_image(np.zeros((32, 32, 3), dtype=np.uint8))
    assert blank["colour"] == "none" and blank["shape"] == "none"


def test_write_concept_is_the_demo_concept(tmp_path):
    paths = write_concept(tmp_path / "concept", n=5, seed=0)
    assert len(paths) == 5
    images = [np.asarray(Image.open(p)) for p in paths]
    for image in images:
        assert image.shape == (32, 32, 3)
        a = analyse_image(image)
        assert a["shape"] == "triangle" and a["colour"] == "magenta"
        assert 18 <= a["side"] <= 22
        rows, _ = np.nonzero(image.max(axis=-1))
        assert rows.min() <= 2 and (rows.min() + rows.max() + 1) / 2 < 16  # hugs the top: centre in the top half
    result = evaluate_images(images, parse_target("magenta triangle large top"))
    assert result["joint"] == 1.0 and result["n"] == 5
    assert set(result["rates"]) == {"colour", "shape", "size", "region"}
    assert evaluate_images(images, {"region": "bottom"})["joint"] == 0.0


def test_evaluate_images_rates():
    specs, images = _generator_images(60, seed=5)
    result = evaluate_images(images, {"shape": "circle", "colour": "red"})
    expected_shape = np.mean([s.shape == "circle" for s in specs])
    expected_joint = np.mean([s.shape == "circle" and s.colour == "red" for s in specs])
    assert result["rates"]["shape"] == pytest.approx(expected_shape)
    assert result["joint"] == pytest.approx(expected_joint)
    with pytest.raises(ValueError):
        evaluate_images(images, {"hue": "red"})
    with pytest.raises(ValueError, match="purple"):
        parse_target("purple triangle")


def test_write_concept_cli(tmp_path):
    out = tmp_path / "toy_concept"
    subprocess.run([sys.executable, "-m", "ldm.data.shapes", "--write_concept", str(out), "--n", "3"],
                   cwd=ROOT, check=True, capture_output=True)
    assert len(list(out.glob("*.png"))) == 3
