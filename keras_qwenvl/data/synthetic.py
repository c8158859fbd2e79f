"""Built-in synthetic data: shapes, rendered words and chats about them.

No download is needed and every example is a pure function of `(seed,
index)`, so a source can be read in any order, by several worker
processes, and gives the same data on every machine.

Two kinds of images are drawn:
- shapes: 1-3 non-overlapping shapes (circle, square, triangle, cross) of
  distinct colour-shape pairs (or of distinct colours, `distinct_colors`),
  random size and place, on a plain or noisy
  grey background (grey, so that no background pixel has a shape's
  colour). Each shape's pixel box is the tight box of its drawn pixels.
  With `grid` set, sides and places are multiples of it (a ViT's patch
  size: each patch then holds one part of a shape in a fixed position).
- words (a SynthDoG-like OCR source): 1-3 distinct words of `WORDS`,
  rendered with Pillow's built-in font (`ImageFont.load_default(size=...)`,
  Pillow >= 10.1) at small random angles over a textured paper background,
  one word per horizontal band, so that reading order (top to bottom) is
  unambiguous. Each word's quad is its rotated ink box: top-left,
  top-right, bottom-right, bottom-left corners, in pixels. With `grid`
  set, each word's (rotated) layer starts on a multiple of it.

Texts are canonical, so that exact match is learnable: shapes are listed
by colour, then kind (`colors` order, then `shapes` order) - "a red
circle, a red cross and a blue square" - and words in reading order. A
caption names the colour before the kind, so in this order each next word
is a lookup of the words before it (the first colour present, then the
kind of that colour's shape), as when naming "the red circle"; listed by
kind first, the colour word would have to anticipate the kind that
follows it.

Tasks (`TASKS`): "caption", "grounded_caption", "grounding" (referring
expression "the red circle" -> its box), "vqa" (the colour of a shape, how
many shapes, is there a ..., the shape of a colour), "ocr", "chat" (a
multi-turn conversation in the fine-tuning JSON form about one image) and
"text" (pure text from the word list). Every example is preprocessor input
(see `keras_qwenvl.data.tasks`) with an `id` and a `meta` dict holding the
ground truth for evaluation (pixel boxes, words, quads, answers).

Keep the vocabularies small for small models: the defaults (5 colours,
4 shapes, 40 words) are sized so that a model of a few million parameters
learns them on CPU in minutes; `SyntheticConfig` changes them.
"""

import dataclasses
import functools
import math
import re

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from keras_qwenvl import chat_format
from keras_qwenvl.data import tasks as task_formats

# Saturated colours, far from grey and from each other.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 0),
    "cyan": (0, 200, 220),
    "pink": (250, 100, 180),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple")
DEFAULT_SHAPES = ("circle", "square", "triangle", "cross")

# Short, distinct lower-case words for the OCR source.
WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "car", "bus",
    "book", "door", "lamp", "cup", "hat", "key", "ship", "rain", "snow",
    "road", "milk", "bread", "apple", "lion", "frog", "wolf", "bear",
    "rose", "leaf", "hill", "lake", "sea", "sky", "box", "pen", "map",
    "king", "gold", "rock", "fire", "egg",
)

TASKS = (
    "caption",
    "grounded_caption",
    "grounding",
    "vqa",
    "ocr",
    "chat",
    "text",
)

# The task mixture (name -> weight) of each training stage in the built-in
# demos: stage 1 aligns vision and language on captions, stage 2 trains the
# multi-task mixture, stage 3 adds multi-turn chats to the tasks. Packed
# rows hold one task, so a task's pull is its share of the target tokens:
# in stage 2 (with the main job's caption loss weight of 2) OCR has ~58%,
# grounding ~20%, captions ~9% (docs/main_job.md, "The mixture").
STAGE_TASKS = {
    1: {"caption": 1, "grounded_caption": 1},
    2: {
        "caption": 3,
        "grounded_caption": 1,
        "grounding": 4,
        "vqa": 2,
        "ocr": 3,
    },
    3: {"chat": 1, "caption": 2, "grounding": 2, "ocr": 2, "vqa": 1},
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What the synthetic images and texts are made of.

    Args:
        image_size: the canvas, an int (square) or `(width, height)`.
        colors: colour names, keys of `COLORS`.
        shapes: shape names, from `SHAPES`.
        num_objects: `(min, max)` shapes per image.
        object_size: `(min, max)` shape size as a fraction of the canvas's
            shorter side.
        noisy_background: probability of a noisy (rather than plain) grey
            background behind the shapes.
        words: the OCR word list.
        num_words: `(min, max)` words per OCR image.
        font_size: `(min, max)` font size as a fraction of the canvas
            height.
        max_angle: the largest rotation of a word, in degrees.
        grid: None, or a cell size in pixels: shapes then have sides and
            places on multiples of it, and words start on multiples of it
            (a ViT's patch size, so that each patch holds one part of a
            shape or word in a fixed position).
        grounding_phrase_in_response: referring-grounding examples put the
            phrase in the response (`tasks.grounding_example`'s
            `phrase_in_response`), so that the loss is on it too.
        distinct_colors: the shapes of one image have distinct colours
            (kinds may repeat), so that a colour names one shape of its
            image; otherwise any distinct colour-shape pairs.
    """

    image_size: object = 112
    colors: tuple = DEFAULT_COLORS
    shapes: tuple = DEFAULT_SHAPES
    num_objects: tuple = (1, 3)
    object_size: tuple = (0.22, 0.4)
    noisy_background: float = 0.5
    words: tuple = WORDS
    num_words: tuple = (1, 3)
    font_size: tuple = (0.14, 0.2)
    max_angle: float = 10.0
    grid: object = None
    grounding_phrase_in_response: bool = False
    distinct_colors: bool = False

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(v) for v in size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(
                "`image_size` must be an int or (width, height), at least "
                f"16 pixels. Received: {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", size)
        for name in ("colors", "shapes", "words"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [c for c in self.colors if c not in COLORS]
        unknown += [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(
                f"Unknown colours or shapes {unknown}; colours are "
                f"{sorted(COLORS)}, shapes {list(SHAPES)}."
            )
        for name in ("colors", "shapes", "words"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"`{name}` must be non-empty and distinct.")
        low, high = self.num_objects
        if self.distinct_colors:
            most, what = len(self.colors), "colours (`distinct_colors`)"
        else:
            most = len(self.colors) * len(self.shapes)
            what = "colour-shape pairs"
        if not 1 <= low <= high <= most:
            raise ValueError(
                f"`num_objects` must be (min, max) with 1 <= min <= max <= "
                f"the number of {what}. Received: {self.num_objects}"
            )
        low, high = self.num_words
        if not 1 <= low <= high <= len(self.words):
            raise ValueError(
                "`num_words` must be (min, max) with 1 <= min <= max <= "
                f"len(words). Received: {self.num_words}"
            )
        if not 0 < self.object_size[0] <= self.object_size[1] <= 1:
            raise ValueError(
                "`object_size` must be (min, max) fractions in (0, 1]. "
                f"Received: {self.object_size}"
            )
        if self.grid is not None:
            low, high = (f * min(size) for f in self.object_size)
            if not (isinstance(self.grid, int) and self.grid > 0) or not any(
                low <= n * self.grid <= high
                for n in range(1, min(size) // self.grid + 1)
            ):
                raise ValueError(
                    "`grid` must be None or a positive int with a multiple "
                    f"within the object sizes ({low:.1f}-{high:.1f} px). "
                    f"Received: {self.grid!r}"
                )


# Drawing.


def _shape_mask(shape, size):
    """A `size` x `size` mask ("L" image) of one shape."""
    mask = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(mask)
    last = size - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    elif shape == "triangle":
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=255)
    elif shape == "cross":
        # Arms half the size wide. With arms a third wide, a cross of three
        # grid cells is five full cells and four empty ones, which a ViT
        # sees patch by patch as a square's cells (docs/main_job.md).
        quarter = size / 4
        draw.rectangle((0, quarter, last, last - quarter), fill=255)
        draw.rectangle((quarter, 0, last - quarter, last), fill=255)
    elif shape == "diamond":
        half = last / 2
        corners = [(half, 0), (last, half), (half, last), (0, half)]
        draw.polygon(corners, fill=255)
    else:  # star: five points, outer radius half the size
        half = last / 2
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.45
            angle = math.pi / 2 + k * math.pi / 5
            x = half + radius * math.cos(angle)
            points.append((x, half - radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    return mask


def _grey_background(rng, size, noisy):
    """A plain or noisy grey canvas (equal channels)."""
    width, height = size
    level = int(rng.integers(60, 200))
    grey = np.full((height, width), level, dtype="int16")
    if noisy:
        amplitude = int(rng.integers(8, 30))
        grey += rng.integers(
            -amplitude, amplitude + 1, (height, width), dtype="int16"
        )
    grey = np.clip(grey, 0, 255).astype("uint8")
    return PIL.Image.fromarray(np.repeat(grey[:, :, None], 3, axis=-1))


def _overlaps(box, others, margin=2):
    x1, y1, x2, y2 = box
    return any(
        x1 < b[2] + margin
        and b[0] < x2 + margin
        and y1 < b[3] + margin
        and b[1] < y2 + margin
        for b in others
    )


def render_shapes(rng, config):
    """Draws one shapes image.

    Args:
        rng: a `numpy.random.Generator`.
        config: a `SyntheticConfig`.

    Returns:
        `(image, objects)`: a uint8 `(H, W, 3)` array and the shapes in
        caption order (by colour, then kind), each `{"color", "shape",
        "box"}` with `box` the tight pixel box `(x1, y1, x2, y2)` of its
        drawn pixels (x2, y2 exclusive).
    """
    width, height = config.image_size
    canvas = _grey_background(
        rng, config.image_size, rng.random() < config.noisy_background
    )
    pairs = [
        (color, shape)
        for shape in range(len(config.shapes))
        for color in range(len(config.colors))
    ]
    count = int(rng.integers(config.num_objects[0], config.num_objects[1] + 1))
    if config.distinct_colors:
        colors = rng.choice(len(config.colors), size=count, replace=False)
        kinds = rng.integers(0, len(config.shapes), size=count)
        chosen = kinds * len(config.colors) + colors  # indices of pairs
    else:
        chosen = rng.choice(len(pairs), size=count, replace=False)
    shorter = min(width, height)
    low, high = (max(4, int(f * shorter)) for f in config.object_size)
    step = config.grid or 1
    if config.grid:  # sides and places on multiples of the grid
        low = -(-low // step)
        high = high // step
    placed = []
    for index in chosen:
        color, shape = pairs[index]
        for _ in range(30):  # rejection sampling of a free place
            size = int(rng.integers(low, high + 1)) * step
            x = int(rng.integers(0, (width - size) // step + 1)) * step
            y = int(rng.integers(0, (height - size) // step + 1)) * step
            box = (x, y, x + size, y + size)
            if not _overlaps(box, [p[2] for p in placed]):
                break
        else:
            continue  # no room left: fewer shapes
        mask = _shape_mask(config.shapes[shape], size)
        canvas.paste(COLORS[config.colors[color]], (x, y), mask)
        left, top, right, bottom = mask.getbbox()
        box = (x + left, y + top, x + right, y + bottom)
        placed.append((shape, color, box))
    placed.sort(key=lambda p: (p[1], p[0]))  # colour, kind
    objects = [
        {
            "color": config.colors[color],
            "shape": config.shapes[shape],
            "box": box,
        }
        for shape, color, box in placed
    ]
    return np.asarray(canvas), objects


@functools.lru_cache(maxsize=None)
def _font(size):
    return PIL.ImageFont.load_default(size=size)


def _paper_background(rng, size):
    """A light textured canvas: tinted paper, stripes or a gradient, noise."""
    width, height = size
    xs = np.arange(width, dtype="float32")[None, :]
    ys = np.arange(height, dtype="float32")[:, None]
    kind = int(rng.integers(3))
    if kind == 0:  # stripes at a random angle
        angle = rng.uniform(0, math.pi)
        frequency = 2 * math.pi / rng.uniform(6, 20)
        phase = xs * (frequency * math.cos(angle))
        shade = 12 * np.sin(phase + ys * (frequency * math.sin(angle)))
    elif kind == 1:  # a linear gradient
        shade = xs * (rng.uniform(-30, 30) / width) + ys * (
            rng.uniform(-30, 30) / height
        )
    else:  # plain
        shade = np.zeros((height, width), dtype="float32")
    shade = shade + rng.integers(-10, 11, (height, width)).astype("float32")
    base = rng.integers(185, 250, 3).astype("float32")
    pixels = np.clip(shade[:, :, None] + base, 0, 255).astype("uint8")
    return PIL.Image.fromarray(pixels)


def _rotate(point, angle, old_size, new_size):
    """Where PIL's `rotate(angle, expand=True)` moves a point."""
    theta = math.radians(angle)
    dx, dy = point[0] - old_size[0] / 2, point[1] - old_size[1] / 2
    return (
        math.cos(theta) * dx + math.sin(theta) * dy + new_size[0] / 2,
        -math.sin(theta) * dx + math.cos(theta) * dy + new_size[1] / 2,
    )


def _word_layer(word, font_size, angle):
    """A rotated mask of one word and its ink quad in the mask's pixels."""
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(word)
    margin = 2
    size = (right - left + 2 * margin, bottom - top + 2 * margin)
    layer = PIL.Image.new("L", size, 0)
    PIL.ImageDraw.Draw(layer).text(
        (margin - left, margin - top), word, fill=255, font=font
    )
    rotated = layer.rotate(angle, resample=PIL.Image.BILINEAR, expand=True)
    ink = (
        (margin, margin),
        (size[0] - margin, margin),
        (size[0] - margin, size[1] - margin),
        (margin, size[1] - margin),
    )
    quad = [_rotate(p, angle, size, rotated.size) for p in ink]
    return rotated, quad


def render_words(rng, config):
    """Draws one OCR image.

    Args:
        rng: a `numpy.random.Generator`.
        config: a `SyntheticConfig`.

    Returns:
        `(image, words)`: a uint8 `(H, W, 3)` array and the words in
        reading order (top to bottom), each `{"word", "quad"}` with `quad`
        four `(x, y)` pixel points: top-left, top-right, bottom-right,
        bottom-left of the word's ink, rotated with it.
    """
    width, height = config.image_size
    canvas = _paper_background(rng, config.image_size)
    count = int(rng.integers(config.num_words[0], config.num_words[1] + 1))
    chosen = rng.choice(len(config.words), size=count, replace=False)
    band = height / count
    low, high = (max(6, int(f * height)) for f in config.font_size)
    words = []
    for number, index in enumerate(chosen):
        word = config.words[index]
        for attempt in range(8):
            if attempt < 7:
                font_size = int(rng.integers(low, high + 1))
                angle = float(rng.uniform(-config.max_angle, config.max_angle))
            else:  # the smallest upright word: fits unless the canvas is tiny
                font_size, angle = low, 0.0
            layer, quad = _word_layer(word, font_size, angle)
            if layer.size[0] <= width and layer.size[1] <= band:
                break
        else:
            raise ValueError(
                f"The word {word!r} does not fit a {width}x{height} canvas "
                f"with {count} words; use a larger `image_size` or a smaller "
                "`font_size`."
            )
        top = number * band
        bottom = top + band - layer.size[1]  # the lowest top in the band
        if config.grid:  # the word's layer starts on a grid point
            step = config.grid
            x = int(rng.integers(0, (width - layer.size[0]) // step + 1)) * step
            rows = np.arange(-(-top // step), bottom // step + 1) * step
            # A band too thin for a grid row keeps its word inside it.
            y = int(rng.choice(rows)) if len(rows) else int(top)
        else:
            x = int(rng.integers(0, width - layer.size[0] + 1))
            y = int(top + rng.integers(0, int(bottom - top) + 1))
        ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        canvas.paste(ink, (x, y), layer)
        words.append(
            {
                "word": word,
                "quad": tuple(
                    (round(px + x, 1), round(py + y, 1)) for px, py in quad
                ),
            }
        )
    return np.asarray(canvas), words


# Texts.


def _phrase(obj):
    return f"{obj['color']} {obj['shape']}"


def _join(items):
    """'a', 'a and b', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption_text(objects):
    """The canonical caption, e.g. "a red circle and a blue square"."""
    return _join([f"a {_phrase(obj)}" for obj in objects])


def _grounded_parts(objects):
    """Grounded-caption parts: "a " + (phrase, box), joined as captions."""
    parts = []
    for number, obj in enumerate(objects):
        if number:
            parts.append(" and a " if number == len(objects) - 1 else ", a ")
        else:
            parts.append("a ")
        parts.append((_phrase(obj), obj["box"]))
    return parts


# The questions of VQA and chat examples.
QUESTIONS = {
    "count": "How many shapes are there?",
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "exists": "Is there a {color} {shape}?",
    "read": "What is written in the picture?",
    "read_with_positions": "Read the text with its positions.",
    "describe": "Describe the picture.",
    "where": "Where is {phrase}?",
}


def _vqa(rng, objects, config):
    """A question about a shapes image and its answer."""
    shape_counts = {}
    color_counts = {}
    for obj in objects:
        shape_counts[obj["shape"]] = shape_counts.get(obj["shape"], 0) + 1
        color_counts[obj["color"]] = color_counts.get(obj["color"], 0) + 1
    kinds = ["count", "exists"]
    if any(n == 1 for n in shape_counts.values()):
        kinds.append("color")
    if any(n == 1 for n in color_counts.values()):
        kinds.append("shape")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "count":
        return QUESTIONS["count"], str(len(objects))
    if kind == "color":
        unique = sorted(s for s, n in shape_counts.items() if n == 1)
        shape = unique[int(rng.integers(len(unique)))]
        color = next(o["color"] for o in objects if o["shape"] == shape)
        return QUESTIONS["color"].format(shape=shape), color
    if kind == "shape":
        unique = sorted(c for c, n in color_counts.items() if n == 1)
        color = unique[int(rng.integers(len(unique)))]
        shape = next(o["shape"] for o in objects if o["color"] == color)
        return QUESTIONS["shape"].format(color=color), shape
    present = {(o["color"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        color, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [
            (c, s)
            for s in config.shapes
            for c in config.colors
            if (c, s) not in present
        ]
        color, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    return QUESTIONS["exists"].format(color=color, shape=shape), answer


def _chat(rng, image, meta, config):
    """A conversation of 2-3 turns about one image, first turn numbered."""
    if "words" in meta:
        turns = [
            (QUESTIONS["read"], " ".join(meta["words"])),
            (
                QUESTIONS["read_with_positions"],
                task_formats.ocr_example(
                    image, list(zip(meta["words"], meta["quads"]))
                )["responses"].strip(),
            ),
        ]
    else:
        objects = meta["objects"]
        turns = [(QUESTIONS["describe"], caption_text(objects))]
        for obj in objects:
            phrase = f"the {_phrase(obj)}"
            box = task_formats.grounding_example(image, phrase, obj["box"])
            answer = f"<ref>{phrase}</ref>{box['responses']}"
            turns.append((QUESTIONS["where"].format(phrase=phrase), answer))
        turns.append(_vqa(rng, objects, config))
    count = int(rng.integers(2, 4))
    order = rng.permutation(len(turns))[:count]
    conversation = []
    for number, turn in enumerate(order):
        question, answer = turns[turn]
        if number == 0:
            question = chat_format.format_pictures([image]) + question
        conversation += [
            {"from": "user", "value": question},
            {"from": "assistant", "value": answer},
        ]
    return conversation


def _make_example(task, rng, config):
    """One example of `task` from `rng`."""
    if task == "text":
        count = int(rng.integers(3, 8))
        words = rng.choice(len(config.words), size=count)
        text = " ".join(config.words[i] for i in words) + "."
        return dict(task_formats.text_example(text), meta={"text": text})
    # OCR is about rendered words; a chat about either kind of image.
    if task == "ocr" or (task == "chat" and rng.random() < 0.5):
        image, words = render_words(rng, config)
        meta = {
            "words": [w["word"] for w in words],
            "quads": [w["quad"] for w in words],
        }
    else:
        image, objects = render_shapes(rng, config)
        meta = {"objects": objects}
    if task == "caption":
        meta["caption"] = caption_text(objects)
        example = task_formats.caption_example(image, meta["caption"])
    elif task == "grounded_caption":
        example = task_formats.grounded_caption_example(
            image, _grounded_parts(objects)
        )
    elif task == "grounding":
        obj = objects[int(rng.integers(len(objects)))]
        meta.update(phrase=f"the {_phrase(obj)}", box=obj["box"])
        example = task_formats.grounding_example(
            image,
            meta["phrase"],
            obj["box"],
            phrase_in_response=config.grounding_phrase_in_response,
        )
    elif task == "vqa":
        question, answer = _vqa(rng, objects, config)
        meta.update(question=question, answer=answer)
        example = task_formats.vqa_example(image, question, answer)
    elif task == "ocr":
        example = task_formats.ocr_example(
            image, list(zip(meta["words"], meta["quads"]))
        )
    else:  # chat
        example = {
            "task": "chat",
            "conversations": _chat(rng, image, meta, config),
            "images": [image],
        }
    example["meta"] = meta
    return example


def vocabulary_words(config=None):
    """Every word the synthetic texts use, for a byte-level vocabulary whose
    words are single tokens (`write_byte_level_vocabulary(path, words)`).

    Args:
        config: a `SyntheticConfig` (its colours, shapes and OCR words);
            defaults to `SyntheticConfig()`.

    Returns:
        A sorted list of distinct words (letters only).
    """
    config = config or SyntheticConfig()
    words = set(config.colors) | set(config.shapes) | set(config.words)
    texts = [
        task_formats.CAPTION_INSTRUCTION,
        task_formats.GROUNDED_CAPTION_INSTRUCTION,
        task_formats.OCR_INSTRUCTION,
        task_formats.VQA_ANSWER_CUE,
        chat_format.format_pictures([None]),
        # Captions, phrases and answers beyond the config's words.
        "a, a and the yes no",
        *QUESTIONS.values(),
    ]
    for text in texts:
        text = re.sub(r"<[^>]*>", " ", text)  # not the special tokens
        words.update(re.findall(r"[A-Za-z]+", text))
    return sorted(words)


# What each place of an image holds, for pre-training a vision encoder.
PLACE_LABELS = ("color", "shape", "word", "x1", "y1", "x2", "y2")


def place_label_sizes(config, cell):
    """`{label: number of classes}` of `place_labels`, the last class of
    each meaning "nothing of this kind here"."""
    cells = -(-max(config.image_size) // cell)
    sizes = {
        "color": len(config.colors),
        "shape": len(config.shapes),
        "word": len(config.words),
    }
    sizes.update({name: cells for name in PLACE_LABELS[3:]})
    return {name: n + 1 for name, n in sizes.items()}


def _things(meta, config):
    """`(labels, pixel box, is_word)` of each shape or word of an
    example's meta: a shape's colour and kind, a word's index; its box
    `(x1, y1, x2, y2)` with x2, y2 exclusive (a word's is the bounding box
    of its quad)."""
    for obj in meta.get("objects", ()):
        names = {
            "color": config.colors.index(obj["color"]),
            "shape": config.shapes.index(obj["shape"]),
        }
        yield names, obj["box"], False
    for word, quad in zip(meta.get("words", ()), meta.get("quads", ())):
        xs, ys = [p[0] for p in quad], [p[1] for p in quad]
        box = (min(xs), min(ys), max(xs), max(ys))
        yield {"word": config.words.index(word)}, box, True


def place_labels(meta, config, grid, cell):
    """What lies at each place of a `grid` x `grid` lattice over a
    synthetic image: the colour and kind of the shape whose box covers the
    place's centre, or the word whose box spans the centre's column and
    whose middle line crosses the place's row (a line of text can be
    thinner than the lattice's spacing), and that box in cells of `cell`
    pixels.

    A vision encoder pre-trained to name these at each of its output tokens
    (one token per adapter query, queries in raster order on a lattice)
    learns what and where things are before a language model reads them.

    Args:
        meta: a synthetic example's `meta`: a shapes image's (`objects`)
            or an OCR image's (`words` and `quads`).
        config: the `SyntheticConfig` that drew it.
        grid: the lattice side (the square root of the adapter's queries).
        cell: the box unit in pixels (the ViT's patch size).

    Returns:
        `{label: int array (grid * grid,)}` for every name in
        `PLACE_LABELS`, in raster order; where a label does not apply (no
        shape or word there; a word's colour and kind; a shape's word) it
        is the last class of `place_label_sizes(config, cell)`.
    """
    sizes = place_label_sizes(config, cell)
    labels = {name: np.full(grid * grid, sizes[name] - 1) for name in sizes}
    width, height = config.image_size
    things = list(_things(meta, config))
    for index in range(grid * grid):
        row, column = divmod(index, grid)
        x, y = (column + 0.5) * width / grid, (row + 0.5) * height / grid
        for names, (x1, y1, x2, y2), is_word in things:
            if is_word:
                middle = (y1 + y2) / 2 * grid / height
                inside = x1 <= x < x2 and row <= middle < row + 1
            else:
                inside = x1 <= x < x2 and y1 <= y < y2
            if inside:
                for name, value in names.items():
                    labels[name][index] = value
                # x2, y2 are exclusive; clipped into the image.
                corners = (x1, y1, x2 - 1, y2 - 1)
                limits = (width, height, width, height)
                for name, value, limit in zip(
                    PLACE_LABELS[3:], corners, limits
                ):
                    value = min(max(int(value), 0), limit - 1)
                    labels[name][index] = value // cell
    return labels


class SyntheticSource:
    """A random-access source of synthetic examples (a Grain data source).

    Example `i` depends only on `(seed, i)` and the config: any slice, any
    order and any number of worker processes give the same examples.

    Args:
        count: the number of examples.
        seed: the seed; use different seeds for training and held-out data.
        tasks: a task name, a sequence of names (drawn uniformly) or a dict
            `{name: weight}`; defaults to every task in `TASKS` equally.
        config: a `SyntheticConfig`; keyword arguments override its fields
            (e.g. `image_size=224`).

    Example:
    ```python
    source = SyntheticSource(1000, seed=0, tasks={"caption": 2, "ocr": 1})
    loader = grain.MapDataset.source(source)  # or a plain list(source)
    ```
    """

    # Every synthetic example holds at most one image (the loader reads
    # this to size its static image slots).
    max_images = 1

    def __init__(self, count, seed=0, tasks=None, config=None, **overrides):
        if count < 0:
            raise ValueError(f"`count` must be >= 0. Received: {count}")
        self.count = int(count)
        self.seed = int(seed)
        config = config or SyntheticConfig()
        self.config = dataclasses.replace(config, **overrides)
        if tasks is None:
            tasks = TASKS
        if isinstance(tasks, str):
            tasks = (tasks,)
        if not isinstance(tasks, dict):
            tasks = {name: 1.0 for name in tasks}
        unknown = [name for name in tasks if name not in TASKS]
        if unknown or not tasks:
            raise ValueError(
                f"Unknown synthetic tasks {unknown}; expected names from "
                f"{list(TASKS)}."
            )
        weights = np.asarray(list(tasks.values()), dtype="float64")
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"Task weights must be >= 0, not all 0: {tasks}")
        self.tasks = tuple(tasks)
        self._cumulative = np.cumsum(weights / weights.sum())

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count}")
        index = int(index) % self.count
        rng = np.random.default_rng((self.seed, index))
        choice = int(np.searchsorted(self._cumulative, rng.random(), "right"))
        task = self.tasks[min(choice, len(self.tasks) - 1)]
        example = _make_example(task, rng, self.config)
        example["id"] = f"synthetic_{task}_{self.seed}_{index}"
        return example

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def __repr__(self):
        return (
            f"SyntheticSource(count={self.count}, seed={self.seed}, "
            f"tasks={list(self.tasks)})"
        )


def synthetic_examples(task, count, seed=0, image_size=112, **config):
    """A list of `count` synthetic examples of one task.

    Args:
        task: a name from `TASKS`.
        count: the number of examples.
        seed: the seed.
        image_size: the canvas, an int or `(width, height)`.
        **config: other `SyntheticConfig` fields.
    """
    return list(
        SyntheticSource(
            count, seed=seed, tasks=task, image_size=image_size, **config
        )
    )


def synthetic_mixture(count, seed=0, weights=None, image_size=112, **config):
    """A `SyntheticSource` mixing tasks.

    Args:
        count: the number of examples.
        seed: the seed.
        weights: `{task: weight}`; defaults to every task in `TASKS`
            equally.
        image_size: the canvas, an int or `(width, height)`.
        **config: other `SyntheticConfig` fields.
    """
    return SyntheticSource(
        count, seed=seed, tasks=weights, image_size=image_size, **config
    )
