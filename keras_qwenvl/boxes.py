"""Regions in Qwen-VL's text form: pixel boxes <-> `<box>` and `<quad>` tags.

Qwen-VL reads and writes regions as text. A box is
`<box>(x1,y1),(x2,y2)</box>` (top-left and bottom-right corners), an OCR
quadrilateral is `<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>`, and the
phrase a region belongs to precedes it as `<ref>phrase</ref>`. Every
coordinate is an integer in `[0, 1000)`: the pixel coordinate divided by the
image width (x) or height (y), times 1000 (paper, Sec. 3.1).

Image sizes are `(width, height)` throughout this module, the order of PIL's
`Image.size` and of the `(x, y)` coordinates (not numpy's `(height, width)`).

Pixel -> text rounds to the nearest integer (`floor(v / size * 1000 + 0.5)`)
and clamps 1000 (the right or bottom image border) to 999. Text -> pixel is
`v / scale * size` as the original code does; its grounding evaluation divides
by `scale=999` instead of 1000. A pixel coordinate therefore survives a round
trip to within half a text unit, `size / 2000` pixels (one unit at the border).
"""

import math
import re

import numpy as np

BOX_SCALE = 1000  # coordinates are integers in [0, 1000) (paper, Sec. 3.1)

_REGION_TAGS = {"box": 2, "quad": 4}  # tag -> number of (x,y) points
# Array shapes of one pixel region: a box, a flat quad, a quad of points.
_REGION_SHAPES = ((4,), (8,), (4, 2))
# `<ref>phrase</ref>` or a region tag, in text order.
_GROUNDING_PATTERN = re.compile(
    r"<ref>(?P<phrase>.*?)</ref>"
    r"|<(?P<tag>box|quad)>(?P<content>.*?)</(?P=tag)>",
    re.DOTALL,
)
# An opening region tag and its closing tag, when there is one.
_OPEN_TAG_PATTERN = re.compile(r"<(box|quad)>(?:(.*?)</\1>)?", re.DOTALL)
# Lenient point, for model output: `( 12 , 34 )`.
_POINT_PATTERN = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")
# Canonical content as the model is trained and scored on: no spaces.
_CANONICAL_POINT = r"\((-?\d+),(-?\d+)\)"


def _check_image_size(image_size):
    """Returns `(width, height)` as floats; both must be positive."""
    try:
        width, height = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(
            "`image_size` must be `(width, height)`. "
            f"Received: image_size={image_size!r}"
        )
    if not (width > 0 and height > 0):
        raise ValueError(
            "`image_size` must be `(width, height)` with positive values. "
            f"Received: image_size={image_size!r}"
        )
    return width, height


def _region_array(region):
    """Returns a region as a float array, or None when it is not numeric."""
    try:
        return np.asarray(region, dtype="float64")
    except (TypeError, ValueError):
        return None


def _as_points(region):
    """Returns a region's corners as a tuple of `(x, y)` float pairs.

    `(x1, y1, x2, y2)` is a box (two corners); `(x1, y1, ..., x4, y4)` or
    `((x1, y1), ..., (x4, y4))` is a quad (four corners).
    """
    values = _region_array(region)
    if (
        values is None
        or values.shape not in _REGION_SHAPES
        or not np.all(np.isfinite(values))
    ):
        raise ValueError(
            "A region must be a box `(x1, y1, x2, y2)` or a quad of four "
            f"`(x, y)` points, with finite numbers. Received: {region!r}"
        )
    flat = values.reshape(-1).tolist()
    return tuple(zip(flat[0::2], flat[1::2]))


def _describe(points):
    """`(x1, y1, x2, y2, ...)` with plain numbers, for error messages."""
    return "(" + ", ".join(f"{v:g}" for point in points for v in point) + ")"


def _to_text_coordinate(value, size):
    """Pixel coordinate -> integer in [0, 1000): round, clamp 1000 to 999."""
    return min(math.floor(value / size * BOX_SCALE + 0.5), BOX_SCALE - 1)


def _normalize_points(region, image_size):
    """Validates a pixel region and returns its corners in the text scale."""
    width, height = _check_image_size(image_size)
    points = _as_points(region)
    outside = [
        (x, y) for x, y in points if not (0 <= x <= width and 0 <= y <= height)
    ]
    if outside:
        raise ValueError(
            f"Region {_describe(points)} lies outside the image of size "
            f"(width, height) = ({width:g}, {height:g}): point "
            f"{_describe(outside[:1])}."
        )
    if len(points) == 2:
        (x1, y1), (x2, y2) = points
        if x2 < x1 or y2 < y1:
            raise ValueError(
                f"Box {_describe(points)} must have x1 <= x2 and y1 <= y2 "
                "(top-left then bottom-right corner); image size (width, "
                f"height) = ({width:g}, {height:g})."
            )
    return tuple(
        (_to_text_coordinate(x, width), _to_text_coordinate(y, height))
        for x, y in points
    )


def normalize_box(box, image_size):
    """Converts a pixel box to Qwen-VL's integer `[0, 1000)` coordinates.

    Args:
        box: `(x1, y1, x2, y2)` in pixels, top-left then bottom-right corner.
        image_size: `(width, height)` of the image in pixels.

    Returns:
        A tuple of four ints in `[0, 1000)`.

    Raises:
        ValueError: if the box is not inside the image or its corners are
            not ordered; the message names the box and the image size.
    """
    points = _normalize_points(box, image_size)
    if len(points) != 2:
        raise ValueError(f"A box has 4 coordinates. Received: {box!r}")
    return tuple(v for point in points for v in point)


def denormalize_box(box, image_size, scale=BOX_SCALE):
    """Converts a box in text coordinates back to pixels: `v / scale * size`.

    Args:
        box: `(x1, y1, x2, y2)` as written in `<box>` (integers).
        image_size: `(width, height)` of the image in pixels.
        scale: the text scale; 1000 (the format), or 999 as the original
            grounding evaluation divides.

    Returns:
        A tuple of four floats in pixels.
    """
    width, height = _check_image_size(image_size)
    x1, y1, x2, y2 = box
    return (
        x1 / scale * width,
        y1 / scale * height,
        x2 / scale * width,
        y2 / scale * height,
    )


def _format_points(points):
    return ",".join(f"({x},{y})" for x, y in points)


def format_box(box, image_size):
    """Writes a pixel box as `<box>(x1,y1),(x2,y2)</box>`.

    Args:
        box: `(x1, y1, x2, y2)` in pixels.
        image_size: `(width, height)` of the image in pixels.

    Example:
    >>> format_box((10, 20, 320, 240), (640, 480))
    '<box>(16,42),(500,500)</box>'
    """
    return f"<box>{_format_points(_normalize_points(box, image_size))}</box>"


def format_quad(quad, image_size):
    """Writes an OCR quadrilateral as `<quad>(x1,y1),...,(x4,y4)</quad>`.

    Args:
        quad: four `(x, y)` pixel points, or the eight numbers flat.
        image_size: `(width, height)` of the image in pixels.
    """
    points = _normalize_points(quad, image_size)
    if len(points) != 4:
        raise ValueError(f"A quad has four (x, y) points. Received: {quad!r}")
    return f"<quad>{_format_points(points)}</quad>"


def format_ref(phrase, regions, image_size):
    """Writes a phrase and its regions: `<ref>phrase</ref><box>...</box>...`.

    Args:
        phrase: the referring expression.
        regions: one box `(x1, y1, x2, y2)` or quad, or a list of them (one
            phrase may name several regions).
        image_size: `(width, height)` of the image in pixels.

    Example:
    >>> format_ref("two dogs", [(0, 0, 50, 50), (60, 0, 100, 50)], (100, 100))
    '<ref>two dogs</ref><box>(0,0),(500,500)</box><box>(600,0),(999,500)</box>'
    """
    values = _region_array(regions)
    if values is not None and values.shape in _REGION_SHAPES:
        regions = [regions]  # a single region
    parts = []
    for region in regions:
        points = _normalize_points(region, image_size)
        tag = "box" if len(points) == 2 else "quad"
        parts.append(f"<{tag}>{_format_points(points)}</{tag}>")
    return f"<ref>{phrase}</ref>{''.join(parts)}"


def parse_grounding(text, image_size, scale=BOX_SCALE):
    """Reads the regions out of model output, in pixels.

    Each `<box>` or `<quad>` becomes one entry. A region belongs to the
    `<ref>` phrase written right before it; several regions may follow one
    phrase (only whitespace between them). A region without such a phrase
    has phrase `None`. Region tags whose content is not the expected number
    of `(x,y)` integer points are skipped (model output may be cut short or
    garbled); use `validate_text_boxes` to reject them instead.

    Args:
        text: model output, e.g. `"<ref>dog</ref><box>(1,2),(300,400)</box>"`.
        image_size: `(width, height)` of the image in pixels.
        scale: the text scale; 1000, or 999 as the original grounding
            evaluation divides.

    Returns:
        A list of dicts `{"phrase": str | None, "box": (x1, y1, x2, y2)}`
        or `{"phrase": str | None, "quad": ((x1, y1), ..., (x4, y4))}`, in
        pixels (floats), in text order.
    """
    width, height = _check_image_size(image_size)
    results = []
    phrase = None
    last_end = 0
    for match in _GROUNDING_PATTERN.finditer(text):
        if text[last_end : match.start()].strip():
            phrase = None  # other text ends the phrase's run of regions
        last_end = match.end()
        if match.group("phrase") is not None:
            phrase = match.group("phrase").strip()
            continue
        tag, content = match.group("tag"), match.group("content")
        points = _POINT_PATTERN.findall(content)
        if len(points) != _REGION_TAGS[tag] or _POINT_PATTERN.sub(
            "", content
        ).strip(" ,"):
            continue
        pixels = tuple(
            (int(x) / scale * width, int(y) / scale * height)
            for x, y in points
        )
        if tag == "box":
            region = pixels[0] + pixels[1]
        else:
            region = pixels
        results.append({"phrase": phrase, tag: region})
    return results


def validate_text_boxes(text, allow_open_end=False):
    """Checks every `<box>` and `<quad>` of a text (training data, prompts).

    A region must be written exactly as the model is trained and scored on:
    `(x1,y1),(x2,y2)` for a box (x1 <= x2, y1 <= y2), four points for a
    quad, integers in `[0, 1000)`, no spaces.

    Args:
        text: the text to check.
        allow_open_end: if `True`, the text may end with an opening `<box>`
            or `<quad>` (possibly followed by a partial, unclosed content)
            that the model is asked to complete, as grounding prompts do.

    Raises:
        ValueError: "box out of range: ..." naming the offending tag when a
            coordinate is outside `[0, 1000)`, "malformed box: ..." when the
            content is not the expected points or a tag is not closed.
    """
    for match in _OPEN_TAG_PATTERN.finditer(text):
        tag, content = match.group(1), match.group(2)
        if content is None:
            if allow_open_end and "<" not in text[match.end() :]:
                continue
            raise ValueError(
                f"malformed box: `<{tag}>` at character {match.start()} is "
                f"not closed by `</{tag}>`: {text[match.start():][:60]!r}"
            )
        written = match.group(0)
        num_points = _REGION_TAGS[tag]
        pattern = ",".join([_CANONICAL_POINT] * num_points)
        parsed = re.fullmatch(pattern, content)
        if parsed is None:
            raise ValueError(
                f"malformed box: {written!r} must hold {num_points} points "
                f"written `(x,y)` with integers and no spaces, separated by "
                "commas."
            )
        values = [int(v) for v in parsed.groups()]
        bad = [v for v in values if not 0 <= v < BOX_SCALE]
        if bad:
            raise ValueError(
                f"box out of range: {written!r} has coordinate {bad[0]}; "
                f"coordinates are integers in [0, {BOX_SCALE})."
            )
        if tag == "box" and (values[2] < values[0] or values[3] < values[1]):
            raise ValueError(
                f"malformed box: {written!r} must be the top-left then the "
                "bottom-right corner (x1 <= x2, y1 <= y2)."
            )
