"""TensorFlow Datasets as raw training examples for `QwenVLDataLoader`.

A tfds dataset read with `tfds.data_source(name, split=...)` (random
access, what Grain reads; no `tf.data` involved) becomes a
`grain.MapDataset` of the pre-training task formats of
`keras_qwenvl.data.tasks`:

- `coco_captions`: one caption sample per caption of an image;
- `ref_coco` (any config): one referring-grounding sample per referring
  expression of an object, its tfds box (normalised `[ymin, xmin, ymax,
  xmax]`) turned into pixels and then written in `[0, 1000)` by
  `keras_qwenvl.boxes`;
- any other dataset with images, texts and (optionally) boxes, through a
  `TfdsMapping` that names those features.

An image has several samples (five captions, several objects with several
expressions each). With `per_image="all"` each element of the returned
dataset is the list of an image's samples; the loader splits such lists
into samples, reading the dataset as a stream in order (shuffle it
beforehand, e.g. `examples.shuffle(seed)`, and repeat it with
`.repeat()`). With `per_image="one"` each element is one sample of its
image, picked at random from `(seed, index)`; the dataset is then random
access, so the loader shuffles it, repeats it and splits it between worker
processes itself (one sample per image and pass, the same one every pass).

```python
source = tfds.data_source("ref_coco/refcoco_unc", split="train")
examples = ref_coco_examples(source, per_image="one")
loader = QwenVLDataLoader(examples, lm.preprocessor, batch_size=16)
```

Samples carry an `id`, `"{name}/{image id}/{k}"` (the element's index when
the mapping names no id feature), so that a bad sample is named in errors.
"""

import dataclasses

import grain
import numpy as np

from keras_qwenvl.data import tasks

# Box formats -> `(x1, y1, x2, y2)` in pixels, given `(width, height)`.
BOX_FORMATS = {
    # tfds `BBoxFeature`: [ymin, xmin, ymax, xmax] as fractions of the size.
    "yxyx_normalized": lambda b, w, h: (
        b[1] * w, b[0] * h, b[3] * w, b[2] * h
    ),
    "xyxy_normalized": lambda b, w, h: (
        b[0] * w, b[1] * h, b[2] * w, b[3] * h
    ),
    "xyxy": lambda b, w, h: (b[0], b[1], b[2], b[3]),
    # COCO annotation files: top-left corner, width and height in pixels.
    "xywh": lambda b, w, h: (b[0], b[1], b[0] + b[2], b[1] + b[3]),
}


def _check_box_format(box_format):
    if box_format not in BOX_FORMATS:
        raise ValueError(
            f"Unknown box format {box_format!r}; expected one of "
            f"{sorted(BOX_FORMATS)}."
        )


def box_to_pixels(box, box_format, image_size):
    """A box in one of `BOX_FORMATS` as `(x1, y1, x2, y2)` pixels.

    Args:
        box: four numbers.
        box_format: a key of `BOX_FORMATS`, e.g. "yxyx_normalized" for
            tfds's `BBoxFeature`.
        image_size: `(width, height)` of the image in pixels.
    """
    _check_box_format(box_format)
    values = np.asarray(box, dtype="float64").reshape(-1)
    if values.shape != (4,):
        raise ValueError(f"A box has four numbers. Received: {box!r}")
    width, height = image_size
    pixels = BOX_FORMATS[box_format](values, width, height)
    return tuple(float(v) for v in pixels)


@dataclasses.dataclass(frozen=True)
class TfdsMapping:
    """Which features of a tfds example make a training sample.

    Features are named by path, nested dicts joined with "/" (as tfds
    prints them): "captions/text" is `example["captions"]["text"]`; a key
    that itself holds a "/" (tfds's "image/id") is found as it is.

    Without `boxes`, every text is a caption: one caption sample each.
    With `boxes`, the texts are referring expressions, aligned with the
    boxes: the i-th entry of `texts` (one string, or a list of strings
    that all refer to the box) goes with the i-th box, one grounding
    sample per expression.

    Args:
        image: the image feature (an `(H, W, C)` array).
        texts: the text feature: a string or a sequence of strings, or
            one string or sequence per box.
        boxes: the box feature, a sequence of boxes, or `None`.
        box_format: the boxes' format, a key of `BOX_FORMATS`.
        id: the feature that names the image in sample ids, or `None`
            (the element's index names it).
        name: the first part of sample ids, e.g. the dataset's name.
    """

    image: str = "image"
    texts: str = "captions/text"
    boxes: str = None
    box_format: str = "yxyx_normalized"
    id: str = "image/id"
    name: str = "tfds"

    def __post_init__(self):
        _check_box_format(self.box_format)


COCO_CAPTIONS = TfdsMapping(
    image="image", texts="captions/text", id="image/id", name="coco_captions"
)
REF_COCO = TfdsMapping(
    image="image",
    texts="objects/refexp/raw",
    boxes="objects/bbox",
    box_format="yxyx_normalized",
    id="image/id",
    name="ref_coco",
)


def feature(example, path):
    """The feature at a "/"-joined path of nested dicts (see
    `TfdsMapping`); raises a `KeyError` naming the keys there are."""
    if path in example:
        return example[path]
    for key in example:
        if isinstance(key, str) and path.startswith(key + "/"):
            value = example[key]
            if isinstance(value, dict):
                try:
                    return feature(value, path[len(key) + 1 :])
                except KeyError:
                    pass
    raise KeyError(
        f"No feature {path!r} in the example; its features are "
        f"{sorted(_paths(example))}."
    )


def _paths(example, prefix=""):
    for key, value in example.items():
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}"


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value).strip()


def _texts(value):
    """A string, or a (nested, ragged) sequence of strings, as a flat list
    of the non-empty ones."""
    if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
        text = _text(value.item() if isinstance(value, np.ndarray) else value)
        return [text] if text else []
    return [text for item in value for text in _texts(item)]


def element_examples(element, mapping, index=0):
    """All training samples of one tfds example (a dict of numpy values).

    Args:
        element: the tfds example, as `tfds.data_source` returns it.
        mapping: a `TfdsMapping`.
        index: the element's index, naming it when the mapping has no id.

    Returns:
        A list of samples of `keras_qwenvl.data.tasks` with an `id`.

    Raises:
        KeyError: a feature of the mapping is missing.
        ValueError: the texts and boxes are not aligned, or a box is not
            inside the image (the message names the element).
    """
    image = np.asarray(feature(element, mapping.image))
    element_id = index if mapping.id is None else feature(element, mapping.id)
    element_id = _text(np.asarray(element_id).item())
    name = f"{mapping.name}/{element_id}"
    texts = feature(element, mapping.texts)
    if mapping.boxes is None:
        samples = [tasks.caption_example(image, t) for t in _texts(texts)]
    else:
        samples = _grounding_examples(
            image, texts, feature(element, mapping.boxes), mapping, name
        )
    for k, sample in enumerate(samples):
        sample["id"] = f"{name}/{k}"
    return samples


def _grounding_examples(image, texts, boxes, mapping, name):
    boxes = list(boxes)
    texts = [texts] if isinstance(texts, (str, bytes)) else list(texts)
    if len(texts) != len(boxes):
        raise ValueError(
            f"Element {name!r}: {len(boxes)} boxes in {mapping.boxes!r} but "
            f"{len(texts)} text entries in {mapping.texts!r}; a grounding "
            "mapping needs one text entry (a string or a list of strings) "
            "per box."
        )
    size = tasks.image_size(image)
    samples = []
    for box, phrases in zip(boxes, texts):
        pixels = box_to_pixels(box, mapping.box_format, size)
        for phrase in _texts(phrases):
            try:
                samples.append(tasks.grounding_example(image, phrase, pixels))
            except ValueError as error:
                raise ValueError(f"Element {name!r}: {error}") from None
    return samples


class _ToExamples:
    """`(index, element)` -> its samples, or one of them (picklable, for
    the loader's worker processes)."""

    def __init__(self, mapping, per_image, seed):
        self.mapping = mapping
        self.per_image = per_image
        self.seed = seed

    def __call__(self, index, element):
        samples = element_examples(element, self.mapping, index)
        if self.per_image == "all":
            return samples
        if not samples:
            raise ValueError(
                f"Element {index} has no sample (no non-empty text); "
                'per_image="one" needs one in every element.'
            )
        rng = np.random.default_rng([self.seed, index])
        return samples[int(rng.integers(len(samples)))]


def tfds_examples(source, mapping, per_image="all", seed=0):
    """A tfds data source as a `grain.MapDataset` of raw examples.

    Args:
        source: a random-access tfds source (`tfds.data_source(...)`), a
            `grain.MapDataset` of tfds examples, or any sequence of them
            (e.g. `list(tfds.as_numpy(dataset))` of a `tf.data` dataset).
        mapping: a `TfdsMapping`.
        per_image: "all" (each element is the list of an image's samples)
            or "one" (each element is one sample; see the module
            docstring).
        seed: picks the sample of each image for `per_image="one"`.

    Returns:
        A `grain.MapDataset`, read lazily: an element is converted when it
        is read.
    """
    if per_image not in ("all", "one"):
        raise ValueError(
            f'`per_image` must be "all" or "one". Received: {per_image!r}'
        )
    if not isinstance(mapping, TfdsMapping):
        raise ValueError(
            f"`mapping` must be a TfdsMapping. Received: {mapping!r}"
        )
    if not isinstance(source, grain.MapDataset):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise ValueError(
                "`source` must be random access (`tfds.data_source(...)`, a "
                "grain.MapDataset or a list of examples). Received: "
                f"{type(source).__name__}. For a tf.data dataset, read it "
                "with tfds.data_source instead, or pass "
                "list(tfds.as_numpy(dataset)) when it is small."
            )
        source = grain.MapDataset.source(source)
    return source.map_with_index(_ToExamples(mapping, per_image, seed))


def coco_caption_examples(source, per_image="all", seed=0):
    """`coco_captions` as caption samples (see `tfds_examples`)."""
    return tfds_examples(source, COCO_CAPTIONS, per_image, seed)


def ref_coco_examples(source, per_image="all", seed=0):
    """`ref_coco` as referring-grounding samples (see `tfds_examples`)."""
    return tfds_examples(source, REF_COCO, per_image, seed)
