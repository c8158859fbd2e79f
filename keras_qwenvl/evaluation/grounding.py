"""Referring expression grounding (RefCOCO, RefCOCO+, RefCOCOg) accuracy.

The model is prompted with `<img>{image}</img><ref>{phrase}</ref><box>` and
completes the box. The original evaluation reads the first
`(x1,y1),(x2,y2)` of the decoded answer, divides it by 999 (not the 1000 of
the text format) and scales it by the image width and height, all in
float32; a hit is an IoU of at least 0.5 with the ground-truth pixel box.
An answer with no such pair counts as the box (0, 0, 0, 0), a miss.

This reading is stricter than `keras_qwenvl.boxes.parse_grounding` (which
needs the `<box>` tags and accepts spaces anywhere): the answer is scored
as the decoder text without special tokens, and a space after the comma
between the two points, as in `(1,2), (3,4)`, makes it unreadable.
"""

import re

import numpy as np

# The original grounding evaluation divides coordinates by 999.
EVALUATION_BOX_SCALE = 999
IOU_THRESHOLD = 0.5

# The original's pattern: the first "(...),(...)" pair.
_POINT_PAIR = re.compile(r"\((.*?)\),\((.*?)\)")


def _point(text):
    """`"x,y"` -> two floats (Python's `float`, as the original)."""
    x, y = (float(value) for value in text.split(","))
    return x, y


def parse_first_box(answer):
    """The first `(x1,y1),(x2,y2)` of a model answer, in text units.

    Args:
        answer: the generated text after the prompt's `<box>`.

    Returns:
        `(x1, y1, x2, y2)` as floats, or `None` when the answer has no
        readable pair of points (the original then scores (0, 0, 0, 0)).
    """
    pairs = _POINT_PAIR.findall(answer)
    if not pairs:
        return None
    first, second = pairs[0]
    if "," not in first or "," not in second:
        return None
    try:
        return _point(first) + _point(second)
    except ValueError:
        return None


def _image_size(image_size):
    try:
        width, height = (float(v) for v in image_size)
    except (TypeError, ValueError):
        width = height = float("nan")
    if not (width > 0 and height > 0):
        raise ValueError(
            "`image_size` must be `(width, height)` with positive values. "
            f"Received: image_size={image_size!r}"
        )
    return width, height


def predicted_box(answer, image_size):
    """The pixel box the original evaluation reads from a model answer.

    Args:
        answer: the generated text after the prompt's `<box>`.
        image_size: `(width, height)` of the image in pixels.

    Returns:
        A float32 array `(x1, y1, x2, y2)` in pixels: the first box of the
        answer divided by 999 and scaled by the image size, or zeros when
        the answer has none.
    """
    width, height = _image_size(image_size)
    box = parse_first_box(answer) or (0.0, 0.0, 0.0, 0.0)
    box = np.asarray(box, dtype="float32") / np.float32(EVALUATION_BOX_SCALE)
    return box * np.asarray([width, height, width, height], dtype="float32")


def _check_box(box, name):
    values = np.asarray(box, dtype="float32")
    if values.shape != (4,) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"`{name}` must be four finite numbers `(x1, y1, x2, y2)`. "
            f"Received: {box!r}"
        )
    return values


def box_iou(box_a, box_b):
    """Intersection over union of two `(x1, y1, x2, y2)` boxes, in float32.

    Computed as torchvision's `box_iou`: areas `(x2 - x1) * (y2 - y1)`,
    intersection clamped at zero; two empty boxes give NaN (not a hit).
    """
    a = _check_box(box_a, "box_a")
    b = _check_box(box_b, "box_b")
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    width_height = np.maximum(
        np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), np.float32(0)
    )
    intersection = width_height[0] * width_height[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(intersection / (area_a + area_b - intersection))


def grounding_accuracy(answer, target_box, image_size):
    """1.0 when the answer's box hits the target (IoU >= 0.5), else 0.0.

    Args:
        answer: the generated text after the prompt's `<box>`.
        target_box: the ground-truth box `(x1, y1, x2, y2)` in pixels.
        image_size: `(width, height)` of the image in pixels.
    """
    iou = box_iou(predicted_box(answer, image_size), target_box)
    return float(iou >= IOU_THRESHOLD)
