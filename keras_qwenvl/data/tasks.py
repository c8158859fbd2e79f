"""Qwen-VL's pre-training task formats as preprocessor input.

Each function returns one sample for `QwenVLCausalLMPreprocessor` (and the
loader): `{"task", "prompts", "responses", "images"}`. The loss is on the
response (and the end token the preprocessor appends), never on the prompt.
Images are passed in memory (or as paths) and fill the empty `<img></img>`
tag at the start of the prompt.

The formats follow the paper's pre-training examples (Box B.1) and the
evaluation prompts of the original repository (prompt -> response):

- caption: `<img></img>Generate the caption in English:` -> ` {caption}`
- grounded caption: `<img></img>Generate the caption in English with
  grounding:` -> ` a <ref>red circle</ref><box>(x1,y1),(x2,y2)</box> ...`
- referring grounding: `<img></img><ref>{phrase}</ref>` ->
  `<box>(x1,y1),(x2,y2)</box>`
- VQA: `<img></img>{question} Answer:` -> ` {answer}`
- OCR: `<img></img>OCR with grounding:` ->
  ` <ref>{word}</ref><quad>(x1,y1),...,(x4,y4)</quad><ref>...`
- pure text: no prompt -> `{text}`

Where the paper leaves spacing open, these choices hold: nothing separates
`</img>` from the prompt text and no newline follows the image (as the
original evaluation prompts); a response that follows a prompt ending in a
colon starts with one space (as the paper's examples, "English: the
beautiful flowers"); the OCR regions of several words follow each other
with nothing between them (the canonical region format has no spaces). The
referring-grounding response starts with `<box>`: the original grounding
evaluation ends its prompt with `<box>`, which is the same token sequence
as this prompt followed by the start of this response. Evaluation must use
the `*_prompt` functions of this module, so that it sees exactly the
training prompts.

Regions are given in pixels of the image and written with
`keras_qwenvl.boxes` (integers in `[0, 1000)`); a region outside the image
raises `BoxOutsideImageError`.
"""

import inspect
import os

import numpy as np
import PIL.Image

from keras_qwenvl import boxes

IMAGE_PLACEHOLDER = "<img></img>"  # filled with the sample's image

# Task prompts (paper, Box B.1).
CAPTION_INSTRUCTION = "Generate the caption in English:"
GROUNDED_CAPTION_INSTRUCTION = "Generate the caption in English with grounding:"
OCR_INSTRUCTION = "OCR with grounding:"
# VQA prompts end with this cue (original evaluation, `{question} Answer:`).
VQA_ANSWER_CUE = " Answer:"


class BoxOutsideImageError(ValueError):
    """A pixel box or quad that does not lie inside its image."""


def image_size(image):
    """`(width, height)` of an image without decoding its pixels.

    Args:
        image: an `(H, W)` or `(H, W, C)` array, a PIL image, or a path
            (only the file header is read).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, or the array does not
            have an image's shape.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No such image file: {path!r}")
        try:
            with PIL.Image.open(path) as opened:
                return opened.size
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"{path!r} is corrupt or not an image ({error})."
            ) from None
    if isinstance(image, PIL.Image.Image):
        return image.size
    shape = np.shape(image)
    if len(shape) not in (2, 3) or shape[2:] not in ((), (1,), (3,), (4,)):
        raise ValueError(
            "An image array must have shape (H, W) or (H, W, C) with C in "
            f"1, 3 or 4. Received shape {shape}."
        )
    if 0 in shape:
        raise ValueError(f"An image array must not be empty: shape {shape}.")
    return shape[1], shape[0]


def _region_text(format_fn, region, size):
    """Runs a `boxes.format_*` function, telling regions outside the image
    apart from other bad regions."""
    try:
        return format_fn(region, size)
    except ValueError as error:
        if "outside the image" in str(error):
            raise BoxOutsideImageError(str(error)) from None
        raise


def _example(task, prompt, response, images):
    return {
        "task": task,
        "prompts": prompt,
        "responses": response,
        "images": list(images),
    }


def caption_prompt():
    """`<img></img>Generate the caption in English:`"""
    return IMAGE_PLACEHOLDER + CAPTION_INSTRUCTION


def grounded_caption_prompt():
    """`<img></img>Generate the caption in English with grounding:`"""
    return IMAGE_PLACEHOLDER + GROUNDED_CAPTION_INSTRUCTION


def grounding_prompt(phrase):
    """`<img></img><ref>{phrase}</ref>`: the model answers with a box."""
    return f"{IMAGE_PLACEHOLDER}<ref>{phrase}</ref>"


def vqa_prompt(question):
    """`<img></img>{question} Answer:`"""
    return IMAGE_PLACEHOLDER + question + VQA_ANSWER_CUE


def ocr_prompt():
    """`<img></img>OCR with grounding:`"""
    return IMAGE_PLACEHOLDER + OCR_INSTRUCTION


def caption_example(image, caption):
    """Image captioning: the caption follows the prompt after a space.

    Args:
        image: the image (array, PIL image or path).
        caption: the caption text.
    """
    return _example("caption", caption_prompt(), f" {caption}", [image])


def grounded_caption_example(image, parts):
    """A caption whose phrases carry their boxes.

    Args:
        image: the image (array, PIL image or path).
        parts: the caption in order, each a string or a pair
            `(phrase, regions)` with `regions` one pixel box
            `(x1, y1, x2, y2)` or a list of them.

    Example:
    >>> image = np.zeros((100, 100, 3), "uint8")
    >>> grounded_caption_example(
    ...     image, ["a ", ("red circle", (10, 10, 50, 50))]
    ... )["responses"]
    ' a <ref>red circle</ref><box>(100,100),(500,500)</box>'
    """
    size = image_size(image)
    pieces = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
            continue
        try:
            phrase, regions = part
        except (TypeError, ValueError):
            raise ValueError(
                "Each part of a grounded caption is a string or a pair "
                f"`(phrase, boxes)`. Received: {part!r}"
            ) from None
        pieces.append(
            _region_text(
                lambda r, s: boxes.format_ref(phrase, r, s), regions, size
            )
        )
    response = " " + "".join(pieces)
    return _example(
        "grounded_caption", grounded_caption_prompt(), response, [image]
    )


def grounding_example(image, phrase, box, phrase_in_response=False):
    """Referring grounding: a phrase in, its box out.

    Args:
        image: the image (array, PIL image or path).
        phrase: the referring expression, e.g. "the red circle".
        box: its pixel box `(x1, y1, x2, y2)`.
        phrase_in_response: False (the original's format): the phrase is
            in the prompt, `<img></img><ref>{phrase}</ref>` ->
            `<box>...</box>`. True: the prompt stops at `<ref>` and the
            response is `{phrase}</ref><box>...</box>`, so the loss is also
            on the phrase (the form of a grounded answer in a chat). The
            tokens are the same either way; `grounding_prompt(phrase)`
            prompts a model trained on either.
    """
    box_text = _region_text(boxes.format_box, box, image_size(image))
    if phrase_in_response:
        prompt = IMAGE_PLACEHOLDER + "<ref>"
        response = f"{phrase}</ref>{box_text}"
    else:
        prompt, response = grounding_prompt(phrase), box_text
    return _example("grounding", prompt, response, [image])


def vqa_example(image, question, answer):
    """Visual question answering: ` {answer}` after `{question} Answer:`."""
    return _example("vqa", vqa_prompt(question), f" {answer}", [image])


def ocr_example(image, words):
    """OCR with grounding: every word and its quadrilateral, in order.

    Args:
        image: the image (array, PIL image or path).
        words: a list of `(word, quad)`, `quad` four `(x, y)` pixel points
            (top-left, top-right, bottom-right, bottom-left of the word).
    """
    size = image_size(image)
    regions = []
    for word, quad in words:
        quad_text = _region_text(boxes.format_quad, quad, size)
        regions.append(f"<ref>{word}</ref>{quad_text}")
    response = " " + "".join(regions)
    return _example("ocr", ocr_prompt(), response, [image])


def text_example(text):
    """Pure text: the loss is on the whole text."""
    return _example("text", "", text, [])


# Task name -> function, for task dicts (see `readers.read_examples`).
TASKS = {
    "caption": caption_example,
    "grounded_caption": grounded_caption_example,
    "grounding": grounding_example,
    "vqa": vqa_example,
    "ocr": ocr_example,
    "text": text_example,
}


def make_example(task, **fields):
    """Builds a sample of a named task from its fields.

    Args:
        task: a key of `TASKS`.
        **fields: the task function's arguments, e.g. `image=...,
            caption=...` for "caption".

    Raises:
        ValueError: for an unknown task or missing/unknown fields.
    """
    if task not in TASKS:
        raise ValueError(
            f"Unknown task {task!r}; expected one of {sorted(TASKS)}."
        )
    function = TASKS[task]
    parameters = inspect.signature(function).parameters
    required = [n for n, p in parameters.items() if p.default is p.empty]
    missing = [n for n in required if n not in fields]
    unknown = [n for n in fields if n not in parameters]
    if missing or unknown:
        raise ValueError(
            f"Task {task!r} takes the fields {required} (optional: "
            f"{[n for n in parameters if n not in required]}); missing "
            f"{missing}, unknown {unknown}."
        )
    return function(**fields)
