"""The toy "shapes" world: 32x32 images of one crisp filled shape on black, with captions.

It is small enough to pretrain a text-to-image LDM on a CPU in minutes, and exact enough for
`evaluation.shapes_eval` to read every attribute back off a generated image.

- shapes: circle, square, triangle (apex up, left-right symmetric), cross (a plus sign whose arms
  are about a third of the side thick, the exact value chosen so the arms stay centred);
- colours: the six saturated RGB primaries and secondaries in COLOURS;
- bounding box: a square of side 10-22 px placed anywhere it fits in the frame.

Pixels belong to a shape by their centres, with no anti-aliasing: each shape covers exactly its
bounding box. Example i of a ShapesDataset is a function of (seed, set, i) alone, so the data are
the same under any number of loader workers.

`python -m ldm.data.shapes --write_concept data/toy_concept` writes the demo concept: five large
(side 18-22) magenta triangles at the top of the frame. `--write_concepts data/concepts` writes the
benchmark's concepts (CONCEPTS: every shape, colour, size class and kind of region) and a manifest.
"""
import argparse
import json
import os
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.image_ops import to_model_range
from ldm.data.personalized import imagenet_templates_small

CANVAS = 32
SIDE_RANGE = (10, 22)
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
# write_concept rows/columns for a region: the box starts within this many pixels of that edge.
# A side of 18-22 cannot fit inside 16 rows, so "top" means hugging the top edge, which puts
# the box centre well inside the top half.
REGION_MARGIN = 2
# Sides of the concept images per size class; the evaluator reads small as <= 14, medium 15-17, large >= 18.
SIZE_CLASSES = {"small": (10, 13), "medium": (15, 17), "large": (18, 22)}
# Where a region puts the box start on each axis (rows, columns): near the low or high edge, centred, or anywhere.
REGION_EDGES = {
    "any": (None, None), "top": ("low", None), "bottom": ("high", None), "left": (None, "low"),
    "right": (None, "high"), "top-left": ("low", "low"), "top-right": ("low", "high"),
    "bottom-left": ("high", "low"), "bottom-right": ("high", "high"), "centre": ("centre", "centre"),
}


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    side: int
    x0: int
    y0: int


def cross_thickness(side):
    """Arm thickness of a cross: the nearest to side / 3 with the parity of side, so the arm is centred."""
    parity = side % 2
    return 2 * int(round((side / 3 - parity) / 2)) + parity


def shape_mask(shape, height, width=None):
    """Boolean (height, width) mask of `shape` filling its whole bounding box."""
    width = height if width is None else width
    rows = np.arange(height)[:, None] + 0.5
    cols = np.arange(width)[None, :] + 0.5
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return ((cols - width / 2) / (width / 2)) ** 2 + ((rows - height / 2) / (height / 2)) ** 2 <= 1.0
    if shape == "triangle":
        # Row widths grow linearly from the apex (1 or 2 px, matching the parity of the width so
        # the triangle is symmetric) to the full width at the base.
        apex = 1 if width % 2 else 2
        inset_at_top = (width - apex) // 2
        inset = np.rint((height - 1 - np.arange(height)) * inset_at_top / max(height - 1, 1)).astype(int)
        cols_int = np.arange(width)[None, :]
        return (cols_int >= inset[:, None]) & (cols_int < width - inset[:, None])
    if shape == "cross":
        tw, th = cross_thickness(width), cross_thickness(height)
        left, top = (width - tw) // 2, (height - th) // 2
        mask = np.zeros((height, width), dtype=bool)
        mask[:, left:left + tw] = True
        mask[top:top + th, :] = True
        return mask
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}")


def render(spec, canvas=CANVAS):
    """uint8 (canvas, canvas, 3) image of one shape on black."""
    if not (0 <= spec.x0 and 0 <= spec.y0 and spec.x0 + spec.side <= canvas and spec.y0 + spec.side <= canvas):
        raise ValueError(f"{spec} does not fit in a {canvas}x{canvas} frame")
    image = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    box = image[spec.y0:spec.y0 + spec.side, spec.x0:spec.x0 + spec.side]
    box[shape_mask(spec.shape, spec.side)] = COLOURS[spec.colour]
    return image


def _offset(rng, side, canvas, edge):
    """Box start along one axis: anywhere it fits, near the `edge` ("low"/"high"), or with the box centre
    within 1 px of the frame centre ("centre")."""
    last = canvas - side
    if edge == "centre":
        return int(rng.integers(int(np.ceil((canvas - side) / 2 - 1)), int(np.floor((canvas - side) / 2 + 1)) + 1))
    if edge == "low":
        return int(rng.integers(0, min(REGION_MARGIN, last) + 1))
    if edge == "high":
        return int(rng.integers(max(last - REGION_MARGIN, 0), last + 1))
    return int(rng.integers(0, last + 1))


def random_spec(rng, canvas=CANVAS, side_range=SIDE_RANGE, shape=None, colour=None, region=None):
    """A random ShapeSpec; fixing shape, colour or region (a key of REGION_EDGES)."""
    if region not in REGION_EDGES and region is not None:
        raise ValueError(f"Unknown region {region!r}; choose one of {list(REGION_EDGES)}")
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    side = int(rng.integers(side_range[0], side_range[1] + 1))
    row_edge, col_edge = REGION_EDGES[region or "any"]
    x0 = _offset(rng, side, canvas, col_edge)
    y0 = _offset(rng, side, canvas, row_edge)
    return ShapeSpec(shape, colour, side, x0, y0)


def caption_for(spec, rng, templates, empty_caption_prob, shape_only_prob):
    """"" with empty_caption_prob, the shape alone with shape_only_prob, else "{colour} {shape}"."""
    u = rng.random()
    template = templates[rng.integers(len(templates))]
    if u < empty_caption_prob:
        return ""
    if u < empty_caption_prob + shape_only_prob:
        return template.format(spec.shape)
    return template.format(f"{spec.colour} {spec.shape}")


class ShapesDataset(Dataset):
    """Procedural text-to-image pairs for pretraining the toy LDM.

    Returns {"image": HWC float32 in [-1, 1], "caption": str}. Images are drawn on the 32x32 canvas
    and scaled to `size` with nearest-neighbour sampling, so they stay crisp. Size and position
    are never named in captions: that is what the textual-inversion demo has to learn.
    """

    def __init__(self, size=CANVAS, length=20000, seed=0, set="train", empty_caption_prob=0.1,
                 shape_only_prob=0.2, templates=imagenet_templates_small):
        if empty_caption_prob + shape_only_prob > 1:
            raise ValueError("empty_caption_prob + shape_only_prob must not exceed 1")
        self.size = size
        self.length = length
        self.seed = seed
        self.set = set
        self.empty_caption_prob = empty_caption_prob
        self.shape_only_prob = shape_only_prob
        self.templates = list(templates)
        self._stream = zlib.crc32(set.encode())  # a different, stable stream per split

    def __len__(self):
        return self.length

    def spec_and_caption(self, i):
        rng = np.random.default_rng([self.seed, self._stream, i])
        spec = random_spec(rng)
        return spec, caption_for(spec, rng, self.templates, self.empty_caption_prob, self.shape_only_prob)

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        spec, caption = self.spec_and_caption(i)
        image = render(spec)
        if self.size != CANVAS:
            image = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.NEAREST)
        return {"image": to_model_range(image), "caption": caption}


def write_concept(folder, n=5, seed=1234, colour="magenta", shape="triangle", side=(18, 22), region="top"):
    """Write n distinct PNGs of one concept (by default the demo: a large magenta triangle at the top)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, seen = [], set()
    for k in range(n):
        spec = random_spec(rng, side_range=side, shape=shape, colour=colour, region=region)
        for _ in range(100):  # a small shape in a corner has few placements: redraw repeats
            if spec not in seen:
                break
            spec = random_spec(rng, side_range=side, shape=shape, colour=colour, region=region)
        seen.add(spec)
        path = os.path.join(folder, f"{colour}_{shape}_{k:02d}.png")
        Image.fromarray(render(spec)).save(path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Concept:
    """A benchmark concept: what the five images share. The words can name its shape (the init word) and
    colour, never its size or region: the learned word has to carry those."""
    name: str
    shape: str
    colour: str
    size: str
    region: str
    seed: int

    @property
    def init_word(self):
        return self.shape

    @property
    def target(self):
        """The toy evaluator's target (evaluation.shapes_eval.parse_target)."""
        return f"{self.colour} {self.shape} {self.size} {self.region}"

    def write(self, folder, n=5):
        return write_concept(folder, n=n, seed=self.seed, colour=self.colour, shape=self.shape,
                             side=SIZE_CLASSES[self.size], region=self.region)


def _concept(colour, shape, size, region, seed):
    return Concept(f"{colour}-{shape}-{size}-{region}", shape, colour, size, region, seed)


# Every shape 3 times, every colour twice, every size class 4 times; all four halves, all four quadrants and
# the centre. The first is the demo concept (the same five images as data/toy_concept).
CONCEPTS = (
    _concept("magenta", "triangle", "large", "top", 1234),
    _concept("red", "circle", "small", "top-left", 101),
    _concept("green", "square", "medium", "bottom", 102),
    _concept("blue", "cross", "large", "left", 103),
    _concept("yellow", "triangle", "small", "bottom-right", 104),
    _concept("cyan", "circle", "medium", "centre", 105),
    _concept("magenta", "square", "small", "right", 206),
    _concept("red", "cross", "medium", "top-right", 107),
    _concept("green", "triangle", "medium", "bottom-left", 108),
    _concept("blue", "circle", "large", "right", 109),
    _concept("yellow", "cross", "small", "centre", 110),
    _concept("cyan", "square", "large", "bottom", 111),
)


def select_concepts(concepts, names=None, what="concept"):
    """concepts, or those named (a list or a comma-separated string), in the order given."""
    if not names:
        return list(concepts)
    by_name = {c.name: c for c in concepts}
    names = names.split(",") if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"Unknown {what}(s) {unknown}; the benchmark's {what}s are {list(by_name)}")
    return [by_name[n] for n in names]


def get_concepts(names=None):
    """CONCEPTS, or those named (a list or a comma-separated string), in the order given."""
    return select_concepts(CONCEPTS, names)


def write_concepts(root, names=None, n=5):
    """Write each concept's n images to root/<name>/ and a manifest root/concepts.json (init words, targets)."""
    os.makedirs(root, exist_ok=True)
    manifest = {}
    for concept in get_concepts(names):
        concept.write(os.path.join(root, concept.name), n=n)
        manifest[concept.name] = {"init_word": concept.init_word, "target": concept.target, "shape": concept.shape,
                                  "colour": concept.colour, "size": concept.size, "region": concept.region,
                                  "sides": list(SIZE_CLASSES[concept.size]), "seed": concept.seed}
    with open(os.path.join(root, "concepts.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description="Toy shapes world utilities")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write_concept", metavar="FOLDER", help="write the images of one concept to FOLDER")
    what.add_argument("--write_concepts", metavar="ROOT",
                      help="write every benchmark concept to ROOT/<name>/, with ROOT/concepts.json")
    parser.add_argument("--concepts", default=None, help="with --write_concepts: only these (comma-separated)")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--colour", default="magenta", choices=list(COLOURS))
    parser.add_argument("--shape", default="triangle", choices=SHAPES)
    parser.add_argument("--min_side", type=int, default=18)
    parser.add_argument("--max_side", type=int, default=22)
    parser.add_argument("--region", default="top", choices=list(REGION_EDGES))
    opt = parser.parse_args(argv)
    if opt.write_concepts:
        try:
            manifest = write_concepts(opt.write_concepts, opt.concepts, n=opt.n)
        except ValueError as error:
            parser.error(str(error))
        print(f"Wrote {len(manifest)} concepts of {opt.n} images each to {opt.write_concepts}")
        return
    paths = write_concept(opt.write_concept, n=opt.n, seed=opt.seed, colour=opt.colour, shape=opt.shape,
                          side=(opt.min_side, opt.max_side), region=opt.region)
    print(f"Wrote {len(paths)} images to {opt.write_concept}")


if __name__ == "__main__":
    main()
