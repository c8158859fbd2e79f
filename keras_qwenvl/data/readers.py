"""Readers: fine-tuning JSON and in-memory examples, validated up front.

Both readers return `(examples, report)`: the examples in the form that
`QwenVLCausalLMPreprocessor` and `keras_qwenvl.data.loader` take, and a
`ReadReport`. Every sample is checked when it is read, cheaply (image files
are opened for their header only, never decoded), so that bad data fails
before training starts rather than in the middle of an epoch:

- `missing_image`: an image path that does not exist;
- `corrupt_image`: a file that is not a readable image, or an array that
  is not an image;
- `box_outside_image`: a pixel box outside its image, or a `<box>` or
  `<quad>` coordinate outside `[0, 1000)`;
- `image_tag_without_image`: an `<img>` tag with no image (an empty tag,
  or more tags than images);
- `conversation_order`: turns that do not alternate user, assistant, ...,
  or do not end with the assistant;
- `invalid`: anything else (malformed boxes, unclosed tags, unknown
  fields, more images than tags).

With `on_error="raise"` (the default) the first bad sample raises a
`BadSampleError` naming it (its `id`, or its index) and the reason. With
`on_error="skip"` bad samples are left out and counted in the report, per
reason, with their ids and messages: nothing is dropped silently.
"""

import collections
import dataclasses
import json
import os

import numpy as np

from keras_qwenvl import boxes
from keras_qwenvl import chat_format
from keras_qwenvl.data import tasks
from keras_qwenvl.tokenizer import IMAGE_SPAN_LENGTH

REASONS = (
    "missing_image",
    "corrupt_image",
    "box_outside_image",
    "image_tag_without_image",
    "conversation_order",
    "invalid",
)


class BadSampleError(ValueError):
    """A sample that cannot be trained on.

    Attributes:
        sample: the sample's id, or its index when it has none.
        reason: one of `REASONS`.
    """

    def __init__(self, sample, reason, message):
        super().__init__(f"sample {sample!r} ({reason}): {message}")
        self.sample = sample
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Raised in loader worker processes and re-raised in the main one.
        return type(self), (self.sample, self.reason, self.message)


@dataclasses.dataclass
class ReadReport:
    """What a reader kept and what it skipped.

    Attributes:
        total: samples read.
        kept: samples returned.
        skipped: a `collections.Counter` of skipped samples per reason.
        skipped_ids: ids (or indices) of the skipped samples, in order.
        messages: `(id, reason, message)` of each skipped sample.
    """

    total: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    skipped_ids: list = dataclasses.field(default_factory=list)
    messages: list = dataclasses.field(default_factory=list)

    def __str__(self):
        counts = ", ".join(
            f"{reason}: {count}"
            for reason, count in sorted(self.skipped.items())
        )
        skipped = sum(self.skipped.values())
        text = f"read {self.total} samples: {self.kept} kept"
        text += f", {skipped} skipped"
        return f"{text} ({counts})" if counts else text


def _check_on_error(on_error):
    if on_error not in ("raise", "skip"):
        raise ValueError(
            f'`on_error` must be "raise" or "skip". Received: {on_error!r}'
        )


def _read_all(samples, convert, on_error):
    """Runs `convert(index, sample)` over samples, raising or skipping."""
    _check_on_error(on_error)
    report = ReadReport()
    examples = []
    for index, sample in enumerate(samples):
        report.total += 1
        try:
            examples.append(convert(index, sample))
        except BadSampleError as error:
            if on_error == "raise":
                raise
            report.skipped[error.reason] += 1
            report.skipped_ids.append(error.sample)
            report.messages.append((error.sample, error.reason, str(error)))
    report.kept = len(examples)
    return examples, report


def _sample_id(sample, index):
    if isinstance(sample, dict) and sample.get("id") is not None:
        return sample["id"]
    return index


def _check_image(image, name, image_dir):
    """Validates one image cheaply; returns it with paths resolved."""
    if isinstance(image, (str, os.PathLike)):
        image = os.fspath(image)
        if image_dir is not None:
            image = os.path.join(image_dir, image)
    try:
        tasks.image_size(image)
    except FileNotFoundError as error:
        raise BadSampleError(name, "missing_image", str(error)) from None
    except ValueError as error:
        raise BadSampleError(name, "corrupt_image", str(error)) from None
    return image


def _check_texts(texts, name):
    """`<img>` tag contents of the texts; checks their boxes and tags."""
    tags = []
    for text in texts:
        if not isinstance(text, str):
            raise BadSampleError(
                name, "invalid", f"texts must be strings. Received: {text!r}"
            )
        try:
            tags += chat_format.find_image_tags(text)
            boxes.validate_text_boxes(text)
        except ValueError as error:
            reason = (
                "box_outside_image"
                if str(error).startswith("box out of range")
                else "invalid"
            )
            raise BadSampleError(name, reason, str(error)) from None
    for tag in tags:
        if len(tag.encode("utf-8")) > IMAGE_SPAN_LENGTH:
            raise BadSampleError(
                name,
                "invalid",
                f"the `<img>` tag text {tag[:40]!r}... is longer than the "
                f"{IMAGE_SPAN_LENGTH} bytes of an image span.",
            )
    return tags


def _check_images_for_tags(tags, images, name, image_dir):
    """The sample's images, one per tag: given, or the tags' paths."""
    if images is not None:
        images = image_list(images)
    try:
        images = chat_format.images_for_tags(tags, images, "images")
    except ValueError as error:
        reason = (
            "invalid"
            if "needs a tag" in str(error)  # more images than tags
            else "image_tag_without_image"
        )
        raise BadSampleError(name, reason, str(error)) from None
    return [_check_image(image, name, image_dir) for image in images]


def _check_conversation(sample, name, image_dir):
    """Validates a fine-tuning conversation; returns it in loader form."""
    conversation = sample.get("conversations")
    try:
        segments = chat_format.conversation_segments(conversation)
    except ValueError as error:
        # Turns out of order, or a last turn that is not the assistant's.
        order = any(
            words in str(error)
            for words in ("was expected", "ends with the assistant")
        )
        reason = "conversation_order" if order else "invalid"
        raise BadSampleError(name, reason, str(error)) from None
    tags = _check_texts([text for text, _ in segments], name)
    images = _check_images_for_tags(
        tags, sample.get("images"), name, image_dir
    )
    return {
        "id": sample.get("id", name),
        "conversations": list(conversation),
        "images": images,
    }


def read_finetune_json(source, image_dir=None, on_error="raise"):
    """Reads the original repository's fine-tuning data.

    The data is a JSON list of `{"id": ..., "conversations": [{"from":
    "user", "value": "Picture 1: <img>path</img>\\nquestion"}, {"from":
    "assistant", "value": "answer"}, ...]}`, paths relative to `image_dir`.
    Each image file's header is read once to check it.

    Args:
        source: a path to the JSON file, or the already loaded list.
        image_dir: the folder of relative image paths; defaults to the JSON
            file's folder (the working directory for a loaded list).
        on_error: "raise" or "skip" (see the module docstring).

    Returns:
        `(examples, report)`: examples `{"id", "conversations", "images"}`
        with `images` the resolved paths, one per `<img>` tag; a
        `ReadReport`.
    """
    _check_on_error(on_error)
    if isinstance(source, (str, os.PathLike)):
        if image_dir is None:
            image_dir = os.path.dirname(os.path.abspath(os.fspath(source)))
        with open(source, encoding="utf-8") as file:
            source = json.load(file)
    if not isinstance(source, list):
        raise ValueError(
            "Fine-tuning data must be a JSON list of samples. Received: "
            f"{type(source).__name__}"
        )

    def convert(index, sample):
        name = _sample_id(sample, index)
        if not isinstance(sample, dict):
            raise BadSampleError(
                name, "invalid", f"a sample is a dict. Received: {sample!r}"
            )
        return _check_conversation(sample, name, image_dir)

    return _read_all(source, convert, on_error)


def _task_fields(sample, name, image_dir):
    """A task dict's fields with its image(s) checked and resolved."""
    fields = {k: v for k, v in sample.items() if k not in ("task", "id")}
    if "image" in fields:
        fields["image"] = _check_image(fields["image"], name, image_dir)
    return fields


def _convert_example(index, sample, image_dir=None):
    """One in-memory example -> loader form, validated (`read_examples`)."""
    name = _sample_id(sample, index)
    if isinstance(sample, str):
        sample = {"task": "text", "text": sample}
    if not isinstance(sample, dict):
        raise BadSampleError(
            name,
            "invalid",
            f"an example is a string or a dict. Received: {sample!r}",
        )
    if "conversations" in sample:
        return _check_conversation(sample, name, image_dir)
    if "prompts" in sample or "text" in sample:
        prompt = sample.get("prompts", "")
        response = sample.get("responses", sample.get("text"))
        images = sample.get("images", sample.get("image"))
        tags = _check_texts([prompt, response], name)
        if images is not None and not tags and "text" in sample:
            # Images given with a plain text go in front, one tag each.
            count = len(image_list(images))
            response = tasks.IMAGE_PLACEHOLDER * count + response
            tags = [""] * count
        images = _check_images_for_tags(tags, images, name, image_dir)
        return {
            "id": name,
            "task": sample.get("task"),
            "prompts": prompt,
            "responses": response,
            "images": images,
        }
    if "task" in sample:
        fields = _task_fields(sample, name, image_dir)
        try:
            example = tasks.make_example(sample["task"], **fields)
        except tasks.BoxOutsideImageError as error:
            raise BadSampleError(
                name, "box_outside_image", str(error)
            ) from None
        except ValueError as error:
            raise BadSampleError(name, "invalid", str(error)) from None
        example["id"] = name
        return example
    raise BadSampleError(
        name,
        "invalid",
        "an example dict needs 'conversations', 'task', 'prompts' and "
        f"'responses', or 'text'. Received keys: {sorted(sample)}",
    )


def image_list(images):
    """One sample's images as a list: a list or tuple of images, an
    `(N, H, W, C)` array, or a single image (a path, a PIL image, an
    `(H, W)` or `(H, W, C)` array) that becomes `[image]`."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def read_examples(examples, image_dir=None, on_error="raise"):
    """Validates in-memory examples and writes them in loader form.

    Accepted examples:
    - a string: pure text.
    - `{"text": ..., "images": [...]}` (or `"image"`): the text with its
      images; its `<img></img>` tags take the images in order, and a text
      without tags gets one tag per image in front.
    - `{"prompts": ..., "responses": ..., "images": [...]}`: the
      preprocessor's form (loss on the response).
    - a task dict with pixel regions, normalized here to `[0, 1000)`:
      `{"task": name, ...fields}` with the fields of the task's function
      in `keras_qwenvl.data.tasks` (`TASKS`), e.g. `{"task": "grounding",
      "image": array, "phrase": "the dog", "box": (x1, y1, x2, y2)}`.
    - a conversation `{"id", "conversations", "images"}` as in the
      fine-tuning JSON, the images given in memory or as tag paths.

    Images are arrays, PIL images or paths (relative to `image_dir`).

    Args:
        examples: a list of examples.
        image_dir: the folder of relative image paths, or `None`.
        on_error: "raise" or "skip" (see the module docstring).

    Returns:
        `(examples, report)`: the examples in loader form, with the sample's
        `id` (its index when it had none); a `ReadReport`.
    """
    return _read_all(
        examples,
        lambda index, sample: _convert_example(index, sample, image_dir),
        on_error,
    )


def to_loader_form(example, index=0, image_dir=None):
    """Writes one example in loader form, validating it as `read_examples`
    does; raises `BadSampleError` naming it (its id, else `index`)."""
    return _convert_example(index, example, image_dir)
