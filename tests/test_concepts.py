"""The concept benchmark's data: ldm.data.shapes.CONCEPTS, their shipped images and their evaluator targets."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.shapes_eval import CENTRE_TOLERANCE, analyse_image, evaluate_images, parse_target
from ldm.data.personalized import list_images
from ldm.data.shapes import (COLOURS, CONCEPTS, SHAPES, SIZE_CLASSES, ShapeSpec, get_concepts, render,
                             write_concepts)
from ldm.data.shapes import main as shapes_main

ROOT = Path(__file__).resolve().parents[1]
OPPOSITE = {"top": "bottom", "bottom": "top", "left": "right", "right": "left", "top-left": "bottom-right",
            "bottom-right": "top-left", "top-right": "bottom-left", "bottom-left": "top-right"}


def _pixels(folder):
    return [np.asarray(Image.open(p).convert("RGB")) for p in list_images(str(folder))]


def test_concepts_span_the_world():
    assert len(CONCEPTS) >= 12
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    assert {c.shape for c in CONCEPTS} == set(SHAPES)
    assert {c.colour for c in CONCEPTS} == set(COLOURS)
    assert {c.size for c in CONCEPTS} == set(SIZE_CLASSES)
    regions = {c.region for c in CONCEPTS}
    assert {"top", "bottom", "left", "right", "centre"} <= regions
    assert {"top-left", "top-right", "bottom-left", "bottom-right"} <= regions
    assert all(c.init_word == c.shape for c in CONCEPTS)


def test_each_concepts_images_match_its_target_and_no_other_region(tmp_path):
    manifest = write_concepts(tmp_path)
    assert list(manifest) == [c.name for c in CONCEPTS]
    for concept in CONCEPTS:
        images = _pixels(tmp_path / concept.name)
        assert len(images) == 5
        result = evaluate_images(images, parse_target(concept.target))
        assert result["joint"] == 1.0, (concept.name, result["rates"])
        assert manifest[concept.name]["target"] == concept.target
        # the images differ (the word has to generalise over them), and none is in the opposite region
        assert len({im.tobytes() for im in images}) == 5
        if concept.region in OPPOSITE:  # a centred box may sit half a pixel into any half
            assert evaluate_images(images, {"region": OPPOSITE[concept.region]})["joint"] == 0.0


def test_shipped_concepts_are_what_the_generator_writes(tmp_path):
    """data/concepts/ is reproducible from the seeds; its first concept is the demo's data/toy_concept."""
    write_concepts(tmp_path)
    for concept in CONCEPTS:
        shipped, fresh = _pixels(ROOT / "data/concepts" / concept.name), _pixels(tmp_path / concept.name)
        assert len(shipped) == len(fresh) == 5
        assert all(np.array_equal(a, b) for a, b in zip(shipped, fresh)), concept.name
    assert json.loads((ROOT / "data/concepts/concepts.json").read_text()) == \
        json.loads((tmp_path / "concepts.json").read_text())
    demo = _pixels(ROOT / "data/toy_concept")
    assert all(np.array_equal(a, b) for a, b in zip(demo, _pixels(ROOT / "data/concepts" / CONCEPTS[0].name)))


def test_evaluator_quadrants_centre_and_medium():
    top_left = analyse_image(render(ShapeSpec("square", "red", 10, 1, 2)))
    assert top_left["region"]["top-left"] and not top_left["region"]["top-right"]
    assert not top_left["region"]["centre"]
    centred = analyse_image(render(ShapeSpec("circle", "red", 12, 10, 10)))
    assert centred["region"]["centre"] and not centred["region"]["top-left"]
    off = 16 + CENTRE_TOLERANCE + 1 - 6  # box centre CENTRE_TOLERANCE + 1 px right of the frame centre
    assert not analyse_image(render(ShapeSpec("circle", "red", 12, off, 10)))["region"]["centre"]
    medium = parse_target("medium")
    sides = {side: evaluate_images([render(ShapeSpec("square", "red", side, 0, 0))], medium)["joint"]
             for side in (14, 15, 17, 18)}
    assert sides == {14: 0.0, 15: 1.0, 17: 1.0, 18: 0.0}


def test_get_concepts_and_cli(tmp_path, capsys):
    names = [CONCEPTS[2].name, CONCEPTS[0].name]
    assert [c.name for c in get_concepts(",".join(names))] == names
    with pytest.raises(ValueError, match="no-such-concept"):
        get_concepts("no-such-concept")
    shapes_main(["--write_concepts", str(tmp_path / "c"), "--concepts", names[0]])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["concepts.json", names[0]]
    with pytest.raises(SystemExit):
        shapes_main(["--write_concepts", str(tmp_path / "d"), "--concepts", "purple-blob"])
    assert "purple-blob" in capsys.readouterr().err


# --- scripts/benchmark_concepts.py on the shipped toy model ---

TOY_CKPT = ROOT / "models/toy/shapes-ldm.safetensors"


def _benchmark(outdir, *extra):
    import subprocess
    import sys
    cmd = [sys.executable, "scripts/benchmark_concepts.py", "--outdir", str(outdir), "--concepts",
           CONCEPTS[1].name, "--max_steps", "2", "--n_samples", "2", "--ddim_steps", "2", "--curve_every", "1",
           "--curve_samples", "2", "--curve_ddim_steps", "2", "--init_cache", str(Path(outdir).parent / "init-cache"),
           *map(str, extra)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.mark.skipif(not TOY_CKPT.is_file(), reason="the toy model is not in this checkout")
def test_benchmark_trains_scores_resumes_and_refuses_mixed_settings(tmp_path):
    import torch
    out = tmp_path / "bench"
    recipe = ["--recipe", "configs/toy/finetune-shapes.yaml", "configs/toy/recipes/original.yaml"]
    first = _benchmark(out, *recipe)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    concept = CONCEPTS[1]
    result = json.loads((out / concept.name / "result.json").read_text())
    for key, prompt in (("learned", "a photo of *"), ("init", f"a photo of a {concept.init_word}")):
        assert result[key]["prompt"] == prompt
        assert all(0.0 <= result[key][k] <= 1.0 for k in ("colour", "shape", "size", "region", "joint"))
    assert [h["step"] for h in result["curve"]] == [0, 1, 2]
    # the recipe overlay was merged: the original's single vector
    learned = torch.load(Path(result["run"]) / "checkpoints/embeddings.pt", weights_only=True)
    assert learned["string_to_param"]["*"].shape[0] == 1
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["learned"]["worst"]["concept"] == concept.name
    assert concept.name in (out / "results.md").read_text()
    for figure in ("curves.png", "grid.png"):
        assert Image.open(out / figure).size[0] > 300
    # run again: the concept is read back, not retrained
    before = (out / concept.name / "result.json").stat().st_mtime_ns
    again = _benchmark(out, *recipe)
    assert again.returncode == 0 and "done before" in again.stdout
    assert (out / concept.name / "result.json").stat().st_mtime_ns == before
    # another recipe in its own folder: it trains, but the init word's score (recipe-independent) is read back
    second = _benchmark(tmp_path / "bench-shipped")
    assert second.returncode == 0 and "init word: scored before" in second.stdout, second.stdout[-3000:]
    reread = json.loads((tmp_path / "bench-shipped" / concept.name / "result.json").read_text())
    assert reread["init"] == result["init"] and reread["learned"]["prompt"] == "a photo of *"
    assert (tmp_path / "bench-shipped" / concept.name / "init_word.png").read_bytes() == \
        (out / concept.name / "init_word.png").read_bytes()
    # other settings into the same folder: refused, nothing overwritten
    other = _benchmark(out)
    assert other.returncode != 0 and "recipe" in other.stderr and "another --outdir" in other.stderr
    assert (out / concept.name / "result.json").stat().st_mtime_ns == before


def test_recipe_overlays_restore_what_they_say():
    """The toy default is XTI with mixed timesteps; the overlays compared against it in docs/method.md undo that."""
    from omegaconf import OmegaConf

    def merged(*overlays):
        paths = ["configs/toy/finetune-shapes.yaml", *overlays]
        return OmegaConf.merge(*(OmegaConf.load(ROOT / p) for p in paths)).model.params

    default = merged()
    assert default.personalization_config.target == "ldm.modules.xti.XTIEmbeddingManager"
    assert default.min_timestep == 700 and default.full_range_fraction == 0.3
    previous = merged("configs/toy/recipes/high-noise-only.yaml")
    assert previous.personalization_config.target == "ldm.modules.embedding_manager.EmbeddingManager"
    assert previous.min_timestep == 700 and previous.full_range_fraction == 0.0
    assert previous.personalization_config.params.num_vectors_per_token == 48
    original = merged("configs/toy/recipes/original.yaml")
    assert original.personalization_config.target == "ldm.modules.embedding_manager.EmbeddingManager"
    assert original.min_timestep == 0 and original.full_range_fraction == 0.0
    assert original.personalization_config.params.num_vectors_per_token == 1
