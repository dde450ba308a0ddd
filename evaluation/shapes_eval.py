"""Read shape, colour, size and position off images of the toy shapes world.

This stands in for the paper's CLIP metrics on the toy model: instead of a similarity, it says
exactly how often generated images show the requested attributes.

Analysis of one image (resized to the 32x32 frame first):
- foreground: pixels whose brightest channel is at least half of full scale (black background,
  saturated colours; half scale is where a blurred edge crosses the true boundary), keeping the
  largest 8-connected blob so stray specks do not move the box;
- colour: the palette colour nearest to the blob's mean colour scaled to a maximum of 1, so that a
  dim magenta is still magenta; "none" when there is no blob;
- shape: the shape whose ideal mask, drawn in the blob's bounding box, overlaps the blob best
  (intersection over union), so the apex-up triangle, the plus sign and the circle are told apart
  by their whole geometry rather than one ratio;
- size: the bounding-box side (the larger of height and width);
- position: the centroid, and the regions of the box centre: halves (top/bottom, left/right),
  quadrants (top-left, ...) and "centre" (within CENTRE_TOLERANCE px of the frame centre on both axes).
"""
from collections import deque

import numpy as np
from PIL import Image

from ldm.data.image_ops import to_uint8_hwc
from ldm.data.shapes import CANVAS, COLOURS, SHAPES, shape_mask

FOREGROUND_THRESHOLD = 0.5
MIN_AREA = 4
LARGE_SIDE = 18
SMALL_SIDE = 14
MEDIUM_SIDES = (15, 17)  # strictly between small and large
CENTRE_TOLERANCE = 3
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
REGIONS = ("top", "bottom", "left", "right") + QUADRANTS + ("centre",)


def largest_component(mask):
    """The largest 8-connected component of a boolean mask (a copy; all False when empty)."""
    seen = np.zeros_like(mask, dtype=bool)
    best = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        component, queue = [], deque([start])
        while queue:
            r, c = queue.popleft()
            component.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask, dtype=bool)
    if best:
        rows, cols = zip(*best)
        out[list(rows), list(cols)] = True
    return out


def nearest_colour(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    rgb = rgb / max(rgb.max(), 1e-6)
    return min(COLOURS, key=lambda name: np.sum((rgb - np.asarray(COLOURS[name]) / 255.0) ** 2))


def shape_scores(blob):
    """IoU of a blob's bounding-box crop with each ideal shape drawn in that box."""
    rows, cols = np.nonzero(blob)
    crop = blob[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scores = {}
    for shape in SHAPES:
        ideal = shape_mask(shape, *crop.shape)
        scores[shape] = float((crop & ideal).sum() / (crop | ideal).sum())
    return scores


def analyse_image(image):
    """Attributes of one image (PIL, uint8 HWC, or float HWC/CHW in [-1, 1], any size)."""
    pixels = to_uint8_hwc(image)
    if pixels.shape[:2] != (CANVAS, CANVAS):
        pixels = np.asarray(Image.fromarray(pixels).resize((CANVAS, CANVAS), Image.Resampling.BOX))
    strength = pixels.max(axis=-1) / 255.0
    blob = largest_component(strength >= FOREGROUND_THRESHOLD)
    area = int(blob.sum())
    if area < MIN_AREA:
        return {"colour": "none", "shape": "none", "side": 0, "height": 0, "width": 0, "area": area,
                "centroid": None, "region": None, "shape_scores": {}}
    rows, cols = np.nonzero(blob)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    scores = shape_scores(blob)
    centre_row, centre_col = (top + bottom) / 2, (left + right) / 2
    halves = {"top": centre_row < CANVAS / 2, "bottom": centre_row > CANVAS / 2,
              "left": centre_col < CANVAS / 2, "right": centre_col > CANVAS / 2}
    quadrants = {q: halves[q.split("-")[0]] and halves[q.split("-")[1]] for q in QUADRANTS}
    centre = max(abs(centre_row - CANVAS / 2), abs(centre_col - CANVAS / 2)) <= CENTRE_TOLERANCE
    return {
        "colour": nearest_colour(pixels[blob].mean(axis=0)),
        "shape": max(scores, key=scores.get),
        "side": int(max(bottom - top, right - left)),
        "height": int(bottom - top),
        "width": int(right - left),
        "area": area,
        "centroid": (float(rows.mean()), float(cols.mean())),
        "region": {**halves, **quadrants, "centre": centre},
        "shape_scores": scores,
    }


def matches(analysis, target):
    """Per-attribute verdicts of one analysis against a target dict (see evaluate_images)."""
    verdict = {}
    if "colour" in target:
        verdict["colour"] = analysis["colour"] == target["colour"]
    if "shape" in target:
        verdict["shape"] = analysis["shape"] == target["shape"]
    if "min_side" in target or "max_side" in target:
        side = analysis["side"]
        verdict["size"] = (side > 0 and side >= target.get("min_side", 0)
                           and side <= target.get("max_side", CANVAS))
    if "region" in target:
        verdict["region"] = bool(analysis["region"] and analysis["region"][target["region"]])
    return verdict


def evaluate_images(images, target):
    """Match rates of images against a target such as
    dict(colour="magenta", shape="triangle", min_side=18, region="top").

    Returns {"n": count, "rates": {attribute: fraction}, "joint": fraction matching every
    attribute, "analyses": per-image analyses}. Attributes: colour, shape, size (min_side and/or
    max_side), region (one of REGIONS).
    """
    unknown = set(target) - {"colour", "shape", "min_side", "max_side", "region"}
    if unknown:
        raise ValueError(f"Unknown target keys {sorted(unknown)}")
    if "region" in target and target["region"] not in REGIONS:
        raise ValueError(f"Unknown region {target['region']!r}; choose one of {REGIONS}")
    analyses = [analyse_image(image) for image in images]
    if not analyses:
        raise ValueError("No images to evaluate")
    verdicts = [matches(a, target) for a in analyses]
    rates = {key: float(np.mean([v[key] for v in verdicts])) for key in verdicts[0]}
    joint = float(np.mean([all(v.values()) for v in verdicts]))
    return {"n": len(analyses), "rates": rates, "joint": joint, "analyses": analyses}


def parse_target(text):
    """A target dict from words such as "magenta triangle large top".

    "large" means a side of at least 18 px (the demo concept), "medium" 15-17 px, "small" at most 14 px;
    regions are halves ("top"), quadrants ("top-left") or "centre".
    """
    target = {}
    for word in text.lower().replace(",", " ").split():
        if word in COLOURS:
            target["colour"] = word
        elif word in SHAPES:
            target["shape"] = word
        elif word == "large":
            target["min_side"] = LARGE_SIDE
        elif word == "small":
            target["max_side"] = SMALL_SIDE
        elif word == "medium":
            target["min_side"], target["max_side"] = MEDIUM_SIDES
        elif word in REGIONS:
            target["region"] = word
        else:
            raise ValueError(f"Unknown word {word!r} in toy target {text!r}; use colours {list(COLOURS)}, "
                             f"shapes {list(SHAPES)}, small/medium/large and {list(REGIONS)}")
    return target
