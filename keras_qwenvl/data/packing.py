"""Packing preprocessed samples into fixed-length rows, without attention
across samples.

Stage 2 of the paper packs same-task samples into sequences of 2048
tokens. A packed row is the concatenation of whole samples, each with its
own tokens, labels and loss weights, so no label crosses a sample boundary.
Its `padding_mask` holds segment ids, the contract of `QwenVLBackbone`: 0
for padding, `k` for the positions of the row's k-th sample; attention
stays within a segment and rotary positions restart at 0 in each one. The
row's images are the samples' images in order (the row's k-th `<img>` span
takes its k-th image), padded with zeros to a fixed `max_images` so that
batch shapes never change.

A sample is never split: one longer than the row is an error naming it.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class PackingStats:
    """How full the packed rows are.

    Attributes:
        samples: samples packed.
        rows: rows produced.
        tokens: real (non-padding) positions in those rows.
        capacity: `rows * sequence_length`.
        images: images packed.
        image_slots: `rows * max_images`.
    """

    samples: int = 0
    rows: int = 0
    tokens: int = 0
    capacity: int = 0
    images: int = 0
    image_slots: int = 0

    @property
    def efficiency(self):
        """The fraction of row positions holding sample tokens."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def __str__(self):
        return (
            f"{self.samples} samples in {self.rows} rows: "
            f"{self.efficiency:.1%} of {self.capacity} positions used, "
            f"{self.images} images in {self.image_slots} slots"
        )


def sample_length(sample, name, sequence_length):
    """The number of positions a preprocessed sample occupies in a row.

    The sample must have been preprocessed to a length larger than the
    number of its tokens (at least `sequence_length + 1`), so that a
    padding position after its last token proves that it was not truncated.

    Args:
        sample: a dict of unbatched `token_ids`, `padding_mask`, `y`,
            `sample_weight` (and `images`), as the preprocessor returns for
            one sample.
        name: the sample's id or index, for the error message.
        sequence_length: the row length.

    Raises:
        ValueError: if the sample is longer than the row, or fills its
            whole preprocessed length (it may have been truncated).
    """
    mask = np.asarray(sample["padding_mask"])
    length = int(np.count_nonzero(mask))
    if length > sequence_length or length == mask.shape[0]:
        at_least = "at least " if length == mask.shape[0] else ""
        raise ValueError(
            f"sample {name!r}: it has {at_least}{length} tokens, more than "
            f"the packed row length {sequence_length}; samples are never "
            "split. Raise `sequence_length` or shorten the sample."
        )
    return length


class RowPacker:
    """Packs samples into rows; rows of one task only hold that task.

    Samples are placed first-fit: into the earliest open row of the same
    task that has room for the sample's tokens and images, else into a new
    row. `rows()` returns the rows in the order they were opened.

    Args:
        sequence_length: the row length.
        max_images: the image slots of a row (0 for text-only data).
        pad_token_id: the token id of padding positions.
        image_shape: `(S, S, 3)` of one image, or `None` for text-only
            data (then rows have no "images").
    """

    def __init__(self, sequence_length, max_images, pad_token_id, image_shape):
        self.sequence_length = sequence_length
        self.max_images = max_images
        self.pad_token_id = pad_token_id
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self._rows = []  # [task, used length, used images, samples]
        self.stats = PackingStats()

    def add(self, sample, name, task=None):
        """Places one sample.

        Args:
            sample: one preprocessed sample (see `sample_length`), with
                `images` of shape `(num_images, S, S, 3)` when the data has
                images.
            name: the sample's id or index, for error messages.
            task: the sample's task; only samples of one task share a row.
        """
        length = sample_length(sample, name, self.sequence_length)
        images = 0 if self.image_shape is None else len(sample["images"])
        if images > self.max_images:
            raise ValueError(
                f"sample {name!r}: it has {images} images, more than the "
                f"{self.max_images} image slots of a row (`max_images`)."
            )
        for row in self._rows:
            if (
                row[0] == task
                and row[1] + length <= self.sequence_length
                and row[2] + images <= self.max_images
            ):
                break
        else:
            row = [task, 0, 0, []]
            self._rows.append(row)
        row[1] += length
        row[2] += images
        row[3].append((sample, length))
        self.stats.samples += 1
        self.stats.tokens += length
        self.stats.images += images

    def rows(self):
        """Writes out the rows packed so far (and forgets them).

        Returns:
            A list of `(x, y, sample_weight)`: `x` a dict of `token_ids`
            (int32), `padding_mask` (int32 segment ids) and `images`
            (float32 `(max_images, S, S, 3)`), `y` int32 and
            `sample_weight` float32, all of length `sequence_length`.
        """
        packed = [self._write(samples) for _, _, _, samples in self._rows]
        self.stats.rows += len(packed)
        self.stats.capacity += len(packed) * self.sequence_length
        self.stats.image_slots += len(packed) * self.max_images
        self._rows = []
        return packed

    def _write(self, samples):
        length = self.sequence_length
        token_ids = np.full((length,), self.pad_token_id, dtype="int32")
        segments = np.zeros((length,), dtype="int32")
        y = np.full((length,), self.pad_token_id, dtype="int32")
        weights = np.zeros((length,), dtype="float32")
        images = []
        start = 0
        for segment, (sample, size) in enumerate(samples, start=1):
            end = start + size
            token_ids[start:end] = sample["token_ids"][:size]
            segments[start:end] = segment
            y[start:end] = sample["y"][:size]
            weights[start:end] = sample["sample_weight"][:size]
            if self.image_shape is not None:
                images.extend(sample["images"])
            start = end
        x = {"token_ids": token_ids, "padding_mask": segments}
        if self.image_shape is not None:
            x["images"] = pad_images(images, self.max_images, self.image_shape)
        return x, y, weights


def pad_images(images, max_images, image_shape):
    """Stacks images into `(max_images, *image_shape)` float32, zero-padded."""
    slots = np.zeros((max_images,) + tuple(image_shape), dtype="float32")
    if len(images):
        slots[: len(images)] = np.stack(images)
    return slots


def pack_samples(
    samples,
    sequence_length,
    max_images,
    pad_token_id,
    image_shape=None,
    names=None,
    tasks=None,
):
    """Packs preprocessed samples into fixed-length rows.

    Args:
        samples: a list of preprocessed samples, each a dict of unbatched
            `token_ids`, `padding_mask`, `y`, `sample_weight` and, with
            images, `images` `(num_images, S, S, 3)`; preprocessed to at
            least `sequence_length + 1` positions (see `sample_length`).
        sequence_length: the row length.
        max_images: the image slots of each row.
        pad_token_id: the id written in padding positions (the
            tokenizer's `pad_token_id`).
        image_shape: `(S, S, 3)`, or `None` for text-only samples.
        names: the samples' ids for error messages (default: indices).
        tasks: the samples' tasks; only samples of one task share a row
            (default: all one task).

    Returns:
        `(rows, stats)`: a list of `(x, y, sample_weight)` rows (see
        `RowPacker.rows`) and a `PackingStats`.

    Example:
    ```python
    samples = [
        {"token_ids": ..., "padding_mask": ..., "y": ..., ...}  # one each
    ]
    rows, stats = pack_samples(samples, 2048, 4, tokenizer.pad_token_id,
                               image_shape=(448, 448, 3))
    print(stats.efficiency)
    ```
    """
    packer = RowPacker(sequence_length, max_images, pad_token_id, image_shape)
    names = range(len(samples)) if names is None else names
    tasks = [None] * len(samples) if tasks is None else tasks
    for sample, name, task in zip(samples, names, tasks):
        packer.add(sample, name, task)
    return packer.rows(), packer.stats
