"""Pictures of grounding: boxes and quads with their phrases, and sheets.

- `draw_regions` draws pixel regions (`{"phrase", "box" | "quad"}`, the
  output of `keras_qwenvl.boxes.parse_grounding`) on an image: one colour
  per phrase, each label on a filled background of its colour so that it
  stays readable on any picture.
- `draw_grounding` draws the regions of a grounding text, e.g. model
  output `"<ref>dog</ref><box>(10,20),(300,400)</box>"`.
- `draw_example` draws the regions of a training sample (any form
  `keras_qwenvl.data.readers.read_examples` takes: a task dict with pixel
  boxes, a prompt/response sample, a conversation) on its first image.
- `contact_sheet` lays images out in a grid with a caption under each,
  e.g. the hits and misses of an evaluation.

Every function returns a PIL image and, given `path`, also saves it as PNG.

Labels use a TrueType font that has glyphs for all their characters, so
that Chinese phrases are readable: the first of `FONT_CANDIDATES` (Noto
CJK, WenQuanYi, Droid Sans Fallback, the macOS and Windows CJK fonts,
DejaVu Sans) that is installed and covers the text, or a font file passed
as `font`. When none covers it, Pillow's built-in font is used
(`ImageFont.load_default`, Latin only: other characters show as boxes).
"""

import colorsys
import functools
import os
import textwrap

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from keras_qwenvl import boxes
from keras_qwenvl.data import readers

# Font files searched, in order, for labels (see the module docstring).
FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-zenhei/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)

# Distinct, saturated colours, one per phrase in order of appearance.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)


def phrase_color(index):
    """The colour of the `index`-th phrase: `PALETTE`, then hues spaced by
    the golden angle."""
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    return tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.85, 0.9))


@functools.lru_cache(maxsize=64)
def _truetype(path, size):
    return PIL.ImageFont.truetype(path, size)


def _glyph_pixels(font, char):
    canvas = PIL.Image.new("L", (48, 48))
    PIL.ImageDraw.Draw(canvas).text((8, 8), char, font=font, fill=255)
    return canvas.tobytes()


@functools.lru_cache(maxsize=4096)
def _has_glyph(path, char):
    """Whether a font draws `char` other than as its missing-glyph box
    (the glyph a private-use code point gets)."""
    font = _truetype(path, 24)
    return _glyph_pixels(font, char) != _glyph_pixels(font, "\U0010fffd")


def find_font(text, size, font=None):
    """A font that draws every character of `text`.

    Args:
        text: the text to draw.
        size: the font size in pixels.
        font: a font file to use first, or `None`.

    Returns:
        A TrueType font of `font` or of `FONT_CANDIDATES` (the first that
        is installed and has all the glyphs), else Pillow's default font.
    """
    if font is not None and not os.path.isfile(font):
        raise FileNotFoundError(f"No such font file: {font!r}")
    chars = {c for c in text if not c.isspace()}
    candidates = ((font,) if font else ()) + FONT_CANDIDATES
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            if all(_has_glyph(path, c) for c in chars):
                return _truetype(path, size)
        except OSError:  # not a font Pillow can read
            continue
    return PIL.ImageFont.load_default(size=size)


def _to_pil(image):
    """An RGB PIL image (a copy) from an array, a PIL image or a path."""
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if array.size and array.max() <= 1.0 and array.min() >= 0.0:
            array = array * 255.0  # floats in [0, 1]
        array = np.clip(np.round(array), 0, 255).astype("uint8")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array).convert("RGB")


def _text_color(background):
    """Black or white, whichever reads better on `background`."""
    red, green, blue = background
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _save(image, path):
    if path is not None:
        image.save(path, format="PNG")
    return image


def _region_points(region):
    if "box" in region:
        x1, y1, x2, y2 = region["box"]
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if "quad" in region:
        return [tuple(point) for point in region["quad"]]
    raise ValueError(
        f"A region has a 'box' or a 'quad'. Received: {region!r}"
    )


def draw_regions(
    image, regions, line_width=None, font_size=None, font=None, path=None
):
    """Draws regions with their phrases on (a copy of) an image.

    Each distinct phrase gets its colour (`phrase_color`, in order of
    appearance; regions without a phrase share one); its label, on a
    filled background of that colour, sits above the region's top-left
    corner, or just inside it when there is no room above.

    Args:
        image: an array, a PIL image or a path.
        regions: dicts `{"phrase": str | None, "box": (x1, y1, x2, y2)}`
            or `{"phrase", "quad": ((x1, y1), ..., (x4, y4))}` in pixels,
            as `boxes.parse_grounding` returns them.
        line_width: the outline width in pixels; default about 1/200 of the
            image's shorter side, at least 2.
        font_size: the label size in pixels; default about 1/25 of the
            shorter side, at least 10.
        font: a font file for the labels (see `find_font`).
        path: where to save the PNG, or `None`.

    Returns:
        The drawn PIL image (RGB).
    """
    picture = _to_pil(image)
    shorter = min(picture.size)
    line_width = line_width or max(2, round(shorter / 200))
    font_size = font_size or max(10, round(shorter / 25))
    draw = PIL.ImageDraw.Draw(picture)
    colors = {}
    labels = []
    for region in regions:
        phrase = region.get("phrase")
        color = colors.setdefault(phrase, phrase_color(len(colors)))
        points = _region_points(region)
        if "box" in region:
            x1, y1, x2, y2 = region["box"]
            draw.rectangle((x1, y1, x2, y2), outline=color, width=line_width)
        else:
            draw.line(points + points[:1], fill=color, width=line_width)
        if phrase:
            labels.append((phrase, color, points[0]))
    # Labels last, so that no outline crosses them.
    for phrase, color, (x, y) in labels:
        label_font = find_font(phrase, font_size, font)
        left, top, right, bottom = draw.textbbox((0, 0), phrase, label_font)
        pad = max(1, font_size // 8)
        width, height = right - left + 2 * pad, bottom - top + 2 * pad
        y = y - height if y - height >= 0 else y + line_width
        x = min(max(x, 0), max(picture.width - width, 0))
        draw.rectangle((x, y, x + width - 1, y + height - 1), fill=color)
        draw.text(
            (x + pad - left, y + pad - top),
            phrase,
            fill=_text_color(color),
            font=label_font,
        )
    return _save(picture, path)


def draw_grounding(image, text, scale=boxes.BOX_SCALE, path=None, **kwargs):
    """Draws the regions of a grounding text (e.g. model output).

    Args:
        image: an array, a PIL image or a path.
        text: text with `<ref>`, `<box>` and `<quad>` tags in `[0, 1000)`
            coordinates.
        scale: the text scale, 1000 or 999 (see `boxes.parse_grounding`).
        path: where to save the PNG, or `None`.
        **kwargs: passed to `draw_regions`.
    """
    picture = _to_pil(image)
    regions = boxes.parse_grounding(text, picture.size, scale=scale)
    return draw_regions(picture, regions, path=path, **kwargs)


def draw_example(example, path=None, **kwargs):
    """Draws a training sample's regions on its first image.

    Args:
        example: a sample in any form `readers.read_examples` takes (task
            dicts with pixel boxes are normalised first, as the loader
            does), with at least one image.
        path: where to save the PNG, or `None`.
        **kwargs: passed to `draw_regions`.
    """
    sample = readers.to_loader_form(example)
    if not sample["images"]:
        raise ValueError(
            f"Sample {sample.get('id')!r} has no image to draw on."
        )
    if "conversations" in sample:
        text = "".join(turn["value"] for turn in sample["conversations"])
    else:
        text = sample["prompts"] + sample["responses"]
    return draw_grounding(sample["images"][0], text, path=path, **kwargs)


def contact_sheet(
    images,
    captions=None,
    columns=4,
    cell_size=256,
    border_colors=None,
    font=None,
    caption_lines=3,
    path=None,
):
    """Lays images out in a grid, each with a caption under it.

    Args:
        images: arrays, PIL images or paths.
        captions: one string per image, or `None`.
        columns: images per row.
        cell_size: the side of each image's square cell in pixels; images
            are scaled to fit it, keeping their aspect ratio.
        border_colors: one RGB colour (or `None`) per image, drawn around
            it, e.g. green for hits and red for misses.
        font: a font file for the captions (see `find_font`).
        caption_lines: caption lines kept under each image (wrapped).
        path: where to save the PNG, or `None`.

    Returns:
        The sheet, a PIL image (RGB, white background).
    """
    images = list(images)
    count = len(images)
    if not count:
        raise ValueError("`images` is empty: a contact sheet needs images.")
    for name, values in (
        ("captions", captions),
        ("border_colors", border_colors),
    ):
        if values is not None and len(values) != count:
            raise ValueError(
                f"`{name}` needs one entry per image: {len(values)} for "
                f"{count} images."
            )
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    font_size = max(10, cell_size // 16)
    line_height = round(font_size * 1.25)
    text_height = caption_lines * line_height + 4 if captions else 0
    margin = max(4, cell_size // 32)
    cell_width = cell_size + margin
    cell_height = cell_size + text_height + margin
    sheet = PIL.Image.new(
        "RGB",
        (columns * cell_width + margin, rows * cell_height + margin),
        "white",
    )
    draw = PIL.ImageDraw.Draw(sheet)
    # Characters per caption line, from the font's average letter width.
    chars = max(8, int(cell_size / (0.55 * font_size)))
    for index, image in enumerate(images):
        picture = _to_pil(image)
        picture.thumbnail((cell_size, cell_size), PIL.Image.Resampling.BICUBIC)
        left = margin + (index % columns) * cell_width
        top = margin + (index // columns) * cell_height
        x = left + (cell_size - picture.width) // 2
        y = top + (cell_size - picture.height) // 2
        sheet.paste(picture, (x, y))
        if border_colors is not None and border_colors[index] is not None:
            width = max(2, cell_size // 64)
            draw.rectangle(
                (x - width, y - width, x + picture.width + width - 1,
                 y + picture.height + width - 1),
                outline=tuple(border_colors[index]),
                width=width,
            )
        if captions:
            lines = textwrap.wrap(str(captions[index]), chars)
            if len(lines) > caption_lines:
                lines = lines[:caption_lines]
                lines[-1] = lines[-1][: chars - 3] + "..."
            caption_font = find_font("".join(lines), font_size, font)
            for k, line in enumerate(lines):
                draw.text(
                    (left, top + cell_size + 2 + k * line_height),
                    line,
                    fill=(0, 0, 0),
                    font=caption_font,
                )
    return _save(sheet, path)
