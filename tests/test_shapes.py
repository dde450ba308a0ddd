"""The toy shapes world: generator spec and determinism, demo concept, and the evaluator's accuracy."""
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
from ldm.data.shapes import main as shapes_main  # the CLI behind python -m ldm.data.shapes

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
    shapes_main(["--write_concept", str(out), "--n", "3"])
    assert len(list(out.glob("*.png"))) == 3


# --- evaluation entry points: the CLIP metrics and scripts/evaluate_model.py ---

def _load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_model", ROOT / "scripts" / "evaluate_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP model saved like a hub snapshot (no tokenizer files)."""
    from transformers import CLIPConfig, CLIPModel
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, max_position_embeddings=77, vocab_size=49408),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_evaluator_similarities(tiny_clip_dir):
    from evaluation.clip_eval import CLIPEvaluator, strip_placeholders
    evaluator = CLIPEvaluator(tiny_clip_dir)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 40, 48, generator=generator) * 2 - 1
    assert evaluator.img_to_img_similarity(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    pil_images = [Image.fromarray(to_uint8_hwc(x)) for x in images[:2]]
    assert evaluator.img_to_img_similarity(pil_images, images[:2]) == pytest.approx(
        evaluator.img_to_img_similarity(images[:2], images[:2]), abs=1e-2)
    cross = evaluator.img_to_img_similarity(images[:1], images[1:])
    text = evaluator.txt_to_img_similarity("a photo of a triangle", images)
    assert -1.0 <= cross < 1.0 - 1e-4 and -1.0 <= text <= 1.0
    a, b = evaluator.get_text_features(["a photo of a cat", "a photo of a dog"])
    assert float(a @ b) < 1.0 - 1e-6  # the tokenizer really distinguishes the words
    assert strip_placeholders("a photo of * on the beach", ["*"]) == "a photo of on the beach"


def test_clip_evaluator_needs_an_existing_folder(tmp_path):
    from evaluation.clip_eval import CLIPEvaluator
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        CLIPEvaluator(tmp_path / "missing_clip")


def test_evaluate_script_scores_an_images_folder(tmp_path, tiny_clip_dir, capsys):
    evaluate_model = _load_script()
    concept = tmp_path / "concept"
    write_concept(concept, n=4, seed=2)
    generated = tmp_path / "generated"
    generated.mkdir()
    for k, spec in enumerate([ShapeSpec("triangle", "magenta", 20, 5, 1), ShapeSpec("circle", "magenta", 20, 5, 1),
                              ShapeSpec("triangle", "green", 12, 3, 15), ShapeSpec("triangle", "magenta", 19, 10, 0)]):
        Image.fromarray(render(spec)).save(generated / f"{k}.png")
    out = tmp_path / "report.json"
    report = evaluate_model.main(["--images_dir", str(generated), "--data_dir", str(concept), "--clip_dir",
                                  str(tiny_clip_dir), "--toy_target", "magenta triangle large top",
                                  "--json", str(out), "--device", "cpu"])
    assert report["generated"]["toy_shape"] == 0.75 and report["generated"]["toy_colour"] == 0.75
    assert report["generated"]["toy_size"] == 0.75 and report["generated"]["toy_joint"] == 0.5
    assert report["reference"]["toy_joint"] == 1.0
    assert -1 <= report["generated"]["clip_img_similarity"] <= 1
    assert -1 <= report["generated"]["clip_txt_similarity"] <= 1
    import json
    assert json.loads(out.read_text())["generated"] == report["generated"]
    printed = capsys.readouterr().out
    assert "toy_joint" in printed and "clip_img_similarity" in printed and "reference" in printed


def test_evaluate_script_refuses_to_measure_nothing(tmp_path):
    evaluate_model = _load_script()
    with pytest.raises(SystemExit, match="Nothing to measure"):
        evaluate_model.main(["--images_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--ckpt"):
        evaluate_model.main(["--toy_target", "red square"])


def test_evaluate_script_samples_a_model(tmp_path, tiny_config, tiny_ckpt):
    from conftest import build_tiny_model
    embedding = tmp_path / "embeddings.pt"
    build_tiny_model(tiny_config).embedding_manager.save(str(embedding))
    config = ROOT / "configs/tiny/txt2img-tiny.yaml"
    evaluate_model = _load_script()
    report = evaluate_model.main(["--config", str(config), "--ckpt", str(tiny_ckpt), "--embedding_path",
                                  str(embedding), "--n_samples", "3", "--batch_size", "2", "--ddim_steps", "2",
                                  "--outdir", str(tmp_path / "out"), "--toy_target", "magenta triangle",
                                  "--device", "cpu"])
    samples = sorted((tmp_path / "out" / "a-photo-of").glob("samples/*.png"))
    assert len(samples) == 3 and report["n_images"] == 3
    assert Image.open(samples[0]).size == (32, 32)
    assert set(report["generated"]) == {"toy_colour", "toy_shape", "toy_joint"}
