"""Toy world v2: identity the vocabulary cannot name, layout it can.

The paper's question is whether a learned word keeps what words cannot say (an object's exact identity)
and stays editable by the words they can (layout). v1 (`ldm.data.shapes`) names everything but
layout; v2 splits an object's attributes into two kinds:

- unnameable (never in a caption): the hue, when it is one of the six in-between hues of
  UNNAMED_HUES (orange, chartreuse, ...), each 30 degrees from the two colour words beside it;
- nameable (in some captions): the six v1 colour words, when the object has one of those hues; the
  shape (the four v1 shape words, "diamond" and "wedge"); the fill PATTERN ("solid", "outlined",
  "striped", "two-tone"); the SIZE class (small or large); the POSITION on a 3x3 grid (top/centre/bottom
  row, left/centre/right column).

A caption names a random subset of the nameable attributes of its object ("a photo of a small striped
red shape on the left", "a rendering of a diamond", ...), never an unnamed hue, and is empty with
probability empty_caption_prob (for classifier-free guidance). The noun is the shape's word when the
shape is named and "shape" otherwise.

Why patterns and shapes have words: the base model was first trained with captions that named neither
(`pattern_words=False`, stage 1 in docs/toy_model.md). It drew every pattern, but no text -- the words
nor a learned embedding -- could choose one: a model learns to take from its text only what its
captions told it, and a learned word can reach only what the text pathway reaches (docs/method.md).
The same holds for a hue: trained on captions that never point at an in-between hue, the model treats colour
words as categories, and no embedding between two of them draws the hue between (stage 2). `hue_blends`
captions (stage 3) put a marker token where the colour word would go, and the text encoder embeds it, while the
base model trains, as the mean of the two colour words beside the hue (`HUE_BLENDS`; `train_blends` of
`FrozenCLIPEmbedder`). The model so learns where each in-between hue lies between the words, as a model trained on
a world's worth of loose captions would; after training no word or token names it. An identity that words
cannot say is then, as in the paper, a point no word sits on, between the ones that do.

Sizes are two classes with a gap between them (small: side 10-13 px, large: 18-21 px) and positions
three per axis (the box against the low edge, centred, against the high edge; within REGION_MARGIN
px), so every attribute can be read back off a 32x32 image, and off the f=4 autoencoder's
reconstruction of it (`evaluation.shapes_v2_eval`). Striped and two-tone patterns alternate full and
half brightness (not colour and black), so the object stays one connected blob; an outline is the
shape minus its interior OUTLINE_WIDTHS px in (the cross, only 4-7 px thick, has no outline).

Example i of a ShapesV2Dataset is a function of (seed, set, i) alone.

`python -m ldm.data.shapes_v2 --write_concepts data/concepts_v2` writes the v2 benchmark's concepts
(CONCEPTS: identities the words cannot fully say, each drawn in five places and both sizes).
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
from ldm.data.shapes import CANVAS, COLOURS, SHAPES as NAMED_SHAPES, select_concepts, shape_mask

UNNAMED_HUES = {
    "orange": (255, 128, 0),
    "chartreuse": (128, 255, 0),
    "spring": (0, 255, 128),
    "azure": (0, 128, 255),
    "violet": (128, 0, 255),
    "rose": (255, 0, 128),
}
HUES = {**COLOURS, **UNNAMED_HUES}  # twelve hues, 30 degrees apart
V2_SHAPES = ("diamond", "wedge")  # the shapes v1 does not have
SHAPES = NAMED_SHAPES + V2_SHAPES
PATTERNS = ("solid", "outline", "striped", "two-tone")
PATTERN_WORDS = {"solid": "solid", "outline": "outlined", "striped": "striped", "two-tone": "two-tone"}
SIZES = {"small": (10, 13), "large": (18, 21)}
SMALL_MAX_SIDE = 15  # between the classes: what reads as small, in the world and off a blurred sample
ROWS = ("top", "centre", "bottom")
COLUMNS = ("left", "centre", "right")
REGION_MARGIN = 2  # a box "against an edge" starts within this many px of it
OUTLINE_WIDTHS = {"small": 1, "large": 2}  # 2 px would leave a small triangle almost no inside
STRIPE_WIDTH = 3
DIM = 0.5  # brightness of the dim parts of striped and two-tone objects
NOUN = "shape"  # the noun of a caption that does not name the shape
# The v1 templates, less those that already say a size: size is a nameable attribute here.
TEMPLATES = tuple(t for t in dict.fromkeys(imagenet_templates_small) if "small" not in t and "large" not in t)
UNNAMEABLE_WORDS = tuple(UNNAMED_HUES)
# hue_blends captions: each in-between hue's marker token and the colour words on either side of it. The base
# model's text encoder (train_blends) embeds a marker as the mean of its two words while it trains, so the model
# learns where between two colour words each in-between hue lies; no word or token names it afterwards.
HUE_BLENDS = {
    "orange": ("&", ("red", "yellow")),
    "chartreuse": ("@", ("yellow", "green")),
    "spring": ("#", ("green", "cyan")),
    "azure": ("$", ("cyan", "blue")),
    "violet": ("%", ("blue", "magenta")),
    "rose": ("^", ("magenta", "red")),
}
# What stage-1 captions (pattern_words=False) never say either.
STAGE1_UNSAID_WORDS = UNNAMEABLE_WORDS + V2_SHAPES + PATTERNS + ("outlined", "stripes", "stripe", "tone")


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    hue: str
    pattern: str
    side: int
    x0: int
    y0: int

    @property
    def size(self):
        return next(name for name, (lo, hi) in SIZES.items() if lo <= self.side <= hi)

    @property
    def row(self):
        return _grid_cell(self.y0, self.side, ROWS)

    @property
    def column(self):
        return _grid_cell(self.x0, self.side, COLUMNS)


def _grid_cell(start, side, names):
    """Which of (low edge, centre, high edge) a box start along one axis is."""
    if start <= REGION_MARGIN:
        return names[0]
    if start + side >= CANVAS - REGION_MARGIN:
        return names[2]
    return names[1]


def object_mask(shape, height, width=None):
    """Boolean (height, width) mask of a v2 shape filling its bounding box."""
    width = height if width is None else width
    if shape in NAMED_SHAPES:  # v1's
        return shape_mask(shape, height, width)
    if shape == "wedge":
        return shape_mask("triangle", height, width)[::-1].copy()
    if shape == "diamond":
        rows = (np.arange(height)[:, None] - (height - 1) / 2) / (height / 2)
        cols = (np.arange(width)[None, :] - (width - 1) / 2) / (width / 2)
        return np.abs(rows) + np.abs(cols) <= 1.0
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}")


def erode(mask, width):
    """Pixels of mask whose whole (2 width + 1)-square neighbourhood is in mask."""
    padded = np.pad(mask, width, constant_values=False)
    out = np.ones_like(mask, dtype=bool)
    h, w = mask.shape
    for dr in range(2 * width + 1):
        for dc in range(2 * width + 1):
            out &= padded[dr:dr + h, dc:dc + w]
    return out


def patterns_for(shape):
    """The patterns a shape can take: a cross is too thin to have an inside, so it has no outline."""
    return tuple(p for p in PATTERNS if not (p == "outline" and shape == "cross"))


def outline_width(side):
    return OUTLINE_WIDTHS["small"] if side <= SMALL_MAX_SIDE else OUTLINE_WIDTHS["large"]


def brightness_map(pattern, mask):
    """Per-pixel brightness (0, DIM or 1) of an object's box: its fill pattern within its mask."""
    side = max(mask.shape)
    rows = np.arange(mask.shape[0])[:, None] * np.ones((1, mask.shape[1]))
    if pattern == "solid":
        level = np.ones(mask.shape)
    elif pattern == "outline":
        level = (~erode(mask, outline_width(side))).astype(float)
    elif pattern == "striped":
        level = np.where((rows // STRIPE_WIDTH) % 2 == 0, 1.0, DIM)
    elif pattern == "two-tone":
        level = np.where(rows < mask.shape[0] // 2, 1.0, DIM)
    else:
        raise ValueError(f"Unknown pattern {pattern!r}; choose one of {PATTERNS}")
    return level * mask


def render(spec, canvas=CANVAS):
    """uint8 (canvas, canvas, 3) image of one object on black."""
    if not (0 <= spec.x0 and 0 <= spec.y0 and spec.x0 + spec.side <= canvas and spec.y0 + spec.side <= canvas):
        raise ValueError(f"{spec} does not fit in a {canvas}x{canvas} frame")
    if spec.pattern not in patterns_for(spec.shape):
        raise ValueError(f"A {spec.shape} cannot be drawn {spec.pattern}; choose one of {patterns_for(spec.shape)}")
    image = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    level = brightness_map(spec.pattern, object_mask(spec.shape, spec.side))
    box = np.rint(level[..., None] * np.asarray(HUES[spec.hue], dtype=float)).astype(np.uint8)
    image[spec.y0:spec.y0 + spec.side, spec.x0:spec.x0 + spec.side] = box
    return image


def _start(rng, side, cell_index):
    """Box start along one axis for grid cell 0 (low edge), 1 (centred, box centre within 1 px) or 2 (high)."""
    last = CANVAS - side
    if cell_index == 0:
        return int(rng.integers(0, REGION_MARGIN + 1))
    if cell_index == 2:
        return int(rng.integers(last - REGION_MARGIN, last + 1))
    return int(rng.integers(int(np.ceil(last / 2 - 1)), int(np.floor(last / 2 + 1)) + 1))


def random_spec(rng, shape=None, hue=None, pattern=None, size=None, row=None, column=None):
    """A random ObjectSpec; any attribute can be fixed (a name from SHAPES, HUES, PATTERNS, SIZES, ROWS,
    COLUMNS)."""
    for value, choices, what in ((shape, SHAPES, "shape"), (hue, HUES, "hue"), (pattern, PATTERNS, "pattern"),
                                 (size, SIZES, "size"), (row, ROWS, "row"), (column, COLUMNS, "column")):
        if value is not None and value not in choices:
            raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}")
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    hue = hue or list(HUES)[rng.integers(len(HUES))]
    allowed = patterns_for(shape)
    pattern = pattern or allowed[rng.integers(len(allowed))]
    size = size or list(SIZES)[rng.integers(len(SIZES))]
    side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
    row_index = ROWS.index(row) if row else int(rng.integers(3))
    column_index = COLUMNS.index(column) if column else int(rng.integers(3))
    return ObjectSpec(shape, hue, pattern, side, _start(rng, side, column_index), _start(rng, side, row_index))


def position_phrase(row, column):
    """Words for the named axes of a grid cell (None = not named): "in the top left", "on the left", "at the
    top"; "in the centre" only when both axes are named and centred (a centred axis alone is not said, as
    "centre" would claim both); "" when nothing is said."""
    if row == "centre" and column == "centre":
        return "in the centre"
    row = None if row == "centre" else row
    column = None if column == "centre" else column
    if row and column:
        return f"in the {row} {column}"
    if row:
        return f"at the {row}"
    if column:
        return f"on the {column}"
    return ""


def caption_for(spec, rng, templates=TEMPLATES, empty_caption_prob=0.1, name_prob=0.6, pattern_words=True,
                hue_blends=False):
    """A caption naming each nameable attribute of spec with probability name_prob, position per axis
    ("" with empty_caption_prob). pattern_words=False gives stage 1's captions, which name neither the
    pattern nor the v2 shapes (and, with the same rng, the same words otherwise). hue_blends=True puts an
    in-between hue's HUE_BLENDS marker where a colour word would go (the same draws: the same caption
    otherwise)."""
    if rng.random() < empty_caption_prob:
        return ""
    template = templates[rng.integers(len(templates))]
    named = rng.random(5) < name_prob  # size, colour, shape, row, column
    shape_words = SHAPES if pattern_words else NAMED_SHAPES
    words = []
    if named[0]:
        words.append(spec.size)
    if pattern_words and rng.random() < name_prob:
        words.append(PATTERN_WORDS[spec.pattern])
    if named[1] and spec.hue in COLOURS:
        words.append(spec.hue)
    elif named[1] and hue_blends:
        words.append(HUE_BLENDS[spec.hue][0])
    words.append(spec.shape if named[2] and spec.shape in shape_words else NOUN)
    phrase = position_phrase(spec.row if named[3] else None, spec.column if named[4] else None)
    return " ".join([template.format(" ".join(words))] + ([phrase] if phrase else []))


class ShapesV2Dataset(Dataset):
    """Procedural text-to-image pairs of world v2: {"image": HWC float32 in [-1, 1], "caption": str}."""

    def __init__(self, size=CANVAS, length=20000, seed=0, set="train", empty_caption_prob=0.1, name_prob=0.6,
                 pattern_words=True, hue_blends=False):
        self.size = size
        self.pattern_words = pattern_words
        self.hue_blends = hue_blends
        self.length = length
        self.seed = seed
        self.set = set
        self.empty_caption_prob = empty_caption_prob
        self.name_prob = name_prob
        self._stream = zlib.crc32(f"v2/{set}".encode())  # a different, stable stream per split

    def __len__(self):
        return self.length

    def spec_and_caption(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self._stream, i])
        spec = random_spec(rng)
        return spec, caption_for(spec, rng, empty_caption_prob=self.empty_caption_prob, name_prob=self.name_prob,
                                 pattern_words=self.pattern_words, hue_blends=self.hue_blends)

    def __getitem__(self, i):
        spec, caption = self.spec_and_caption(i)
        image = render(spec)
        if self.size != CANVAS:
            image = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.NEAREST)
        return {"image": to_model_range(image), "caption": caption}


@dataclass(frozen=True)
class Concept:
    """A v2 benchmark concept: an identity (shape, hue, fill pattern) whose hue no word names. Its images vary in
    size and position, so identity is all they share; the init word is the shape's word."""
    name: str
    shape: str
    hue: str
    pattern: str
    init_word: str
    seed: int

    @property
    def target(self):
        """The v2 evaluator's target words (evaluation.shapes_v2_eval.parse_target) for the identity."""
        return f"{self.hue} {self.pattern} {self.shape}"

    @property
    def human_caption(self):
        """What the vocabulary can say of the identity: the pattern's word, the colour word when the hue has one,
        then the shape's, after "a" as in the training captions ("a photo of a {}"): "a striped red square", "a
        outlined circle". The paper's "human captions" reference of the ablation (docs/method.md)."""
        words = [PATTERN_WORDS[self.pattern]] + ([self.hue] if self.hue in COLOURS else []) + [self.shape]
        return "a " + " ".join(words)

    def specs(self, n=5):
        """n objects of this identity in n different grid cells, both sizes among them."""
        rng = np.random.default_rng(self.seed)
        cells = rng.permutation(len(ROWS) * len(COLUMNS))[:n]
        sizes = [list(SIZES)[k % len(SIZES)] for k in range(n)]
        sizes = [sizes[k] for k in rng.permutation(n)]
        return [random_spec(rng, shape=self.shape, hue=self.hue, pattern=self.pattern, size=size,
                            row=ROWS[cell // len(COLUMNS)], column=COLUMNS[cell % len(COLUMNS)])
                for cell, size in zip(cells, sizes)]

    def write(self, folder, n=5):
        os.makedirs(folder, exist_ok=True)
        paths = []
        for k, spec in enumerate(self.specs(n)):
            paths.append(os.path.join(folder, f"{self.name}_{k:02d}.png"))
            Image.fromarray(render(spec)).save(paths[-1])
        return paths


def _concept(hue, pattern, shape, seed):
    return Concept(f"{hue}-{pattern}-{shape}", shape, hue, pattern, shape, seed)


# Every unnamed hue twice, every pattern at least twice (outline 4, striped 3, two-tone 3, solid 2), every shape at
# least once (the diamond 3 times): the words can say each one's shape and pattern, none its hue.
CONCEPTS = (
    _concept("orange", "striped", "circle", 301),
    _concept("violet", "outline", "square", 302),
    _concept("azure", "two-tone", "triangle", 303),
    _concept("rose", "solid", "diamond", 304),
    _concept("chartreuse", "striped", "wedge", 305),
    _concept("spring", "outline", "circle", 306),
    _concept("spring", "striped", "diamond", 307),
    _concept("violet", "two-tone", "cross", 308),
    _concept("orange", "outline", "wedge", 309),
    _concept("chartreuse", "two-tone", "square", 310),
    _concept("azure", "solid", "cross", 311),
    _concept("rose", "outline", "diamond", 312),
)
# `make demo`'s concept (scripts/demo.py): not one of the benchmark's, so the demo is not scored on what chose the
# recipe.
DEMO_CONCEPT = _concept("azure", "striped", "square", 401)


def get_concepts(names=None):
    """CONCEPTS, or those named (a list or a comma-separated string), in the order given."""
    return select_concepts(CONCEPTS, names, what="v2 concept")


def write_concepts(root, names=None, n=5):
    """Write each concept's n images to root/<name>/ and a manifest root/concepts.json."""
    os.makedirs(root, exist_ok=True)
    manifest = {}
    for concept in get_concepts(names):
        concept.write(os.path.join(root, concept.name), n=n)
        manifest[concept.name] = {"init_word": concept.init_word, "target": concept.target, "shape": concept.shape,
                                  "hue": concept.hue, "pattern": concept.pattern, "seed": concept.seed}
    with open(os.path.join(root, "concepts.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description="Toy world v2 utilities")
    parser.add_argument("--write_concepts", metavar="ROOT", required=True,
                        help="write every v2 benchmark concept to ROOT/<name>/, with ROOT/concepts.json")
    parser.add_argument("--concepts", default=None, help="only these (comma-separated)")
    parser.add_argument("--n", type=int, default=5)
    opt = parser.parse_args(argv)
    try:
        manifest = write_concepts(opt.write_concepts, opt.concepts, n=opt.n)
    except ValueError as error:
        parser.error(str(error))
    print(f"Wrote {len(manifest)} concepts of {opt.n} images each to {opt.write_concepts}")


if __name__ == "__main__":
    main()
