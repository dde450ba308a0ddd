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
