"""Read every attribute of toy world v2 (`ldm.data.shapes_v2`) back off an image.

Analysis of one image (resized to the 32x32 frame first):
- object: pixels whose brightest channel is at least FOREGROUND_THRESHOLD of full scale (low enough
  to keep the half-bright parts of striped and two-tone objects), largest 8-connected blob; its holes
  (background pixels the frame's border cannot reach) filled give the object's silhouette;
- hue: the hue angle of the blob's mean colour, nearest of the twelve HUES (30 degrees apart);
- shape: the shape whose ideal mask, drawn in the silhouette's bounding box, overlaps it best (IoU);
- pattern: the one whose ideal brightness map (the world's own, drawn in the silhouette's box) is
  nearest to the object's brightness relative to its bright parts (mean squared difference);
- size: the bounding-box side, "small" up to SMALL_MAX_SIDE, "large" above (the world's sides are
  10-13 and 18-21);
- row and column: the box centre's grid cell on each axis: low (< CELL_EDGES[0]), high
  (> CELL_EDGES[1]) or centre (the world's centres are <= 12.5, 15-17, >= 19.5).
"""
import colorsys
from collections import deque

import numpy as np
from PIL import Image

from evaluation.shapes_eval import largest_component
from ldm.data.image_ops import to_uint8_hwc
from ldm.data.shapes_v2 import (CANVAS, COLUMNS, HUES, PATTERNS, ROWS, SHAPES, SIZES, SMALL_MAX_SIDE, brightness_map,
                                object_mask)

FOREGROUND_THRESHOLD = 0.3
MIN_AREA = 4
CELL_EDGES = (14.0, 18.0)
ATTRIBUTES = ("hue", "shape", "pattern", "size", "row", "column")
HUE_ANGLES = {name: colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0] * 360 for name, rgb in HUES.items()}


def fill_holes(blob):
    """blob plus every pixel the frame's border cannot reach through non-blob pixels (4-connected)."""
    h, w = blob.shape
    outside = np.zeros_like(blob, dtype=bool)
    queue = deque((r, c) for r in range(h) for c in range(w)
                  if (r in (0, h - 1) or c in (0, w - 1)) and not blob[r, c])
    for r, c in queue:
        outside[r, c] = True
    while queue:
        r, c = queue.popleft()
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w and not blob[rr, cc] and not outside[rr, cc]:
                outside[rr, cc] = True
                queue.append((rr, cc))
    return ~outside


def nearest_hue(rgb):
    angle = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255.0))[0] * 360
    return min(HUE_ANGLES, key=lambda name: min(abs(angle - HUE_ANGLES[name]), 360 - abs(angle - HUE_ANGLES[name])))


def shape_scores(silhouette):
    rows, cols = np.nonzero(silhouette)
    crop = silhouette[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return {shape: float((crop & object_mask(shape, *crop.shape)).sum() / (crop | object_mask(shape, *crop.shape)).sum())
            for shape in SHAPES}


def read_pattern(silhouette, strength):
    """The pattern whose ideal brightness, drawn in the silhouette, is nearest (mean squared) to the
    object's brightness relative to its bright parts."""
    rows, cols = np.nonzero(silhouette)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    crop = silhouette[box]
    observed = np.clip(strength[box] / np.percentile(strength[box][crop], 90), 0, 1)
    errors = {pattern: float(((observed - brightness_map(pattern, crop))[crop] ** 2).mean()) for pattern in PATTERNS}
    return min(errors, key=errors.get)


def grid_cell(centre, names):
    if centre < CELL_EDGES[0]:
        return names[0]
    if centre > CELL_EDGES[1]:
        return names[2]
    return names[1]


def analyse_image(image):
    """Attributes of one image (PIL, uint8 HWC, or float HWC/CHW in [-1, 1], any size); "none" for each
    when there is no object."""
    pixels = to_uint8_hwc(image)
    if pixels.shape[:2] != (CANVAS, CANVAS):
        pixels = np.asarray(Image.fromarray(pixels).resize((CANVAS, CANVAS), Image.Resampling.BOX))
    strength = pixels.max(axis=-1) / 255.0
    blob = largest_component(strength >= FOREGROUND_THRESHOLD)
    if blob.sum() < MIN_AREA:
        return {**{key: "none" for key in ATTRIBUTES}, "side": 0, "centre": None}
    silhouette = fill_holes(blob)
    rows, cols = np.nonzero(silhouette)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    scores = shape_scores(silhouette)
    side = int(max(bottom - top, right - left))
    centre = ((top + bottom) / 2, (left + right) / 2)
    return {
        "hue": nearest_hue(pixels[blob].mean(axis=0)),
        "shape": max(scores, key=scores.get),
        "pattern": read_pattern(silhouette, strength),
        "size": "small" if side <= SMALL_MAX_SIDE else "large",
        "row": grid_cell(centre[0], ROWS),
        "column": grid_cell(centre[1], COLUMNS),
        "side": side,
        "centre": (float(centre[0]), float(centre[1])),
    }


def target_of(spec):
    """The full target of an ObjectSpec: what an image of it must read back as."""
    return {"hue": spec.hue, "shape": spec.shape, "pattern": spec.pattern, "size": spec.size, "row": spec.row,
            "column": spec.column}


CHOICES = {"hue": tuple(HUES), "shape": SHAPES, "pattern": PATTERNS, "size": tuple(SIZES), "row": ROWS,
           "column": COLUMNS}


def evaluate_images(images, target):
    """Match rates of images against a target dict with any of the keys ATTRIBUTES, e.g.
    dict(hue="orange", pattern="striped", column="left").

    Returns {"n", "rates": {attribute: fraction}, "joint": fraction matching every attribute, "analyses"}.
    """
    for key, value in target.items():
        if key not in CHOICES:
            raise ValueError(f"Unknown target attribute {key!r}; choose from {ATTRIBUTES}")
        if value not in CHOICES[key]:
            raise ValueError(f"Unknown {key} {value!r} in the target; choose one of {list(CHOICES[key])}")
    analyses = [analyse_image(image) for image in images]
    if not analyses:
        raise ValueError("No images to evaluate")
    verdicts = [{key: a[key] == value for key, value in target.items()} for a in analyses]
    rates = {key: float(np.mean([v[key] for v in verdicts])) for key in target}
    joint = float(np.mean([all(v.values()) for v in verdicts]))
    return {"n": len(analyses), "rates": rates, "joint": joint, "analyses": analyses}


def parse_target(text):
    """A target dict from words such as "orange striped diamond small top-left": hue, shape and pattern
    names, small/large, and position words (top/bottom: the row; left/right: the column; centre: both;
    "top-left" and the like: both)."""
    target = {}
    for word in text.lower().replace(",", " ").split():
        if word in HUES:
            target["hue"] = word
        elif word in SHAPES:
            target["shape"] = word
        elif word in PATTERNS:
            target["pattern"] = word
        elif word in SIZES:
            target["size"] = word
        elif word == "centre":
            target["row"], target["column"] = "centre", "centre"
        elif all(part in ROWS + COLUMNS for part in word.split("-")) and word.split("-")[0] != "centre":
            for part in word.split("-"):
                target["row" if part in ROWS else "column"] = part
        else:
            raise ValueError(f"Unknown word {word!r} in the v2 target {text!r}; use hues {list(HUES)}, shapes "
                             f"{list(SHAPES)}, patterns {list(PATTERNS)}, small/large, top/bottom/left/right/centre "
                             "or a corner such as top-left")
    return target
