"""A loader that turns raw examples into fixed-shape training batches.

`QwenVLDataLoader` maps raw examples (strings, task dicts, prompt/response
dicts, fine-tuning conversations; see `readers.read_examples`) through
`QwenVLCausalLMPreprocessor`, optionally packs them (see `packing`), and
batches them as `(x, y, sample_weight)` with static shapes:

- `x["token_ids"]`: int32 `(batch, sequence_length)`;
- `x["padding_mask"]`: int32 `(batch, sequence_length)`, 0 for padding and
  k for the k-th sample of a row (always 1 without packing);
- `x["images"]`: float32 `(batch, max_images, S, S, 3)`, unused slots zero
  (absent for a text-only preprocessor);
- `y`: int32 `(batch, sequence_length)`;
- `sample_weight`: float32 `(batch, sequence_length)`.

When the preprocessor has `num_loss_positions` = k, each batch's labels
that carry loss are then gathered (`select_loss_positions`): `y` and
`sample_weight` are `(batch, k)` and `x["loss_positions"]` int32
`(batch, k)`, so that the model computes logits only there.

Fixed shapes mean one compiled training step for the whole run. The
pipeline is built on Grain: preprocessing runs in `num_workers` worker
processes (`mp_prefetch`), so the model is not kept waiting by tokenizing
and image resizing. A random-access source (a list, a `SyntheticSource`, a
`grain.MapDataset`) is shuffled with a seed, reshuffled on every pass when
repeated, and gives the same batches for the same seed. Its batches do not
depend on `num_workers` unless packing is on (each worker then packs its own
windows of samples; still deterministic for a given `num_workers`).

`fit()` takes raw examples directly once `QwenVLCausalLM` mixes in
`RawExamplesMixin`: Python lists, dicts of columns, Grain datasets and
`tf.data` datasets of raw examples are routed through this loader
(`fit_loader`), on every backend. A `tf.data` dataset of raw examples is
read in Python (`as_numpy_iterator`), since the preprocessor (tiktoken,
PIL) cannot run inside a TensorFlow graph.
"""

import grain
import keras
import numpy as np
from absl import flags
from keras_hub.src.utils.tensor_utils import no_convert_scope

from keras_qwenvl.causal_lm_preprocessor import select_loss_positions
from keras_qwenvl.data import readers
from keras_qwenvl.data.packing import PackingStats
from keras_qwenvl.data.packing import RowPacker
from keras_qwenvl.data.packing import pad_images

try:
    import tensorflow as tf
except ImportError:  # pragma: no cover
    tf = None

# Batches (or packing windows) each process reads ahead of the consumer.
_READ_AHEAD = 4


# Raw inputs: columns, batches, tf.data elements.


def _to_python(value):
    """A `tf.data` numpy element -> Python strings, lists and arrays."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(item) for item in value]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return _to_python(value.tolist())
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _is_batch(element):
    """Whether a raw element is a batch (columns) rather than one example."""
    if isinstance(element, (list, tuple)):
        return True
    if isinstance(element, dict):
        for key in ("prompts", "text"):
            if key in element:
                return not isinstance(element[key], str)
        conversations = element.get("conversations")
        if isinstance(conversations, (list, tuple)) and conversations:
            return not isinstance(conversations[0], dict)
    return False


def split_batch(element):
    """Splits a batch of raw examples into single examples.

    Args:
        element: a list of examples, or a dict of columns such as
            `{"prompts": [...], "responses": [...], "images": [...]}` or
            `{"conversations": [conversation, ...], "images": [...]}`.

    Returns:
        A list of single examples (dicts or strings).
    """
    if isinstance(element, (list, tuple)):
        return list(element)
    key = next(k for k in ("prompts", "text", "conversations") if k in element)
    count = len(element[key])
    rows = [{} for _ in range(count)]
    for name, column in element.items():
        batched = isinstance(column, (list, tuple, np.ndarray))
        if batched and len(column) == count:
            for row, value in zip(rows, column):
                row[name] = value
        else:
            raise ValueError(
                f"The column {name!r} has no entry per example ({count} "
                f"examples in {key!r}); every column of a batch needs one."
            )
    return rows


def _count_images(example):
    """Images of one raw example, counted without reading them."""
    if isinstance(example, dict):
        images = example.get("images", example.get("image"))
        if images is not None:
            return len(readers.image_list(images))
        texts = [example.get(k) for k in ("prompts", "responses", "text")]
        for turn in example.get("conversations") or []:
            if isinstance(turn, dict):
                texts.append(turn.get("value", turn.get("content")))
        return sum(t.count("<img>") for t in texts if isinstance(t, str))
    if isinstance(example, str):
        return example.count("<img>")
    return 0


class _TFExamples(grain.IterDataset):
    """A Grain stream over a `tf.data` dataset of raw examples.

    Its iterator's state is the number of elements read; restoring it
    reads the dataset again up to there (exact for a deterministic
    dataset).
    """

    def __init__(self, dataset):
        super().__init__()
        self._dataset = dataset

    def __iter__(self):
        return _TFExamplesIterator(self._dataset)


class _TFExamplesIterator(grain.DatasetIterator):
    def __init__(self, dataset):
        super().__init__()
        self._dataset = dataset
        self.set_state({"consumed": 0})

    def __next__(self):
        element = next(self._iterator)
        self._consumed += 1
        return _to_python(element)

    def get_state(self):
        return {"consumed": self._consumed}

    def set_state(self, state):
        self._iterator = self._dataset.as_numpy_iterator()
        self._consumed = 0
        for _ in range(state["consumed"]):
            next(self._iterator)
            self._consumed += 1


class _SplitBatches(grain.experimental.FlatMapTransform):
    """Raw elements -> single examples (batches are split)."""

    max_fan_out = 1 << 16

    def flat_map(self, element):
        return split_batch(element) if _is_batch(element) else [element]


def _is_random_access(source):
    """A list, a dict of columns, a `grain.MapDataset` of single examples,
    or any object with `__len__` and `__getitem__` (a Grain data source)."""
    if isinstance(source, grain.MapDataset):
        return not (len(source) and _is_batch(source[0]))
    if isinstance(source, (list, tuple, dict)):
        return True
    if isinstance(source, (str, grain.IterDataset)) or (
        tf is not None and isinstance(source, tf.data.Dataset)
    ):
        return False
    return hasattr(source, "__len__") and hasattr(source, "__getitem__")


def _indexed(index, example):
    return index, example


# Preprocessing.


class _Preprocess:
    """One raw example -> one preprocessed sample record (numpy).

    Errors name the example (its id, else its index in the source) as
    `readers.BadSampleError`.
    """

    def __init__(
        self,
        preprocessor,
        sequence_length,
        max_images,
        image_dir,
        task_loss_weights=None,
        phrase_loss_weight=1.0,
    ):
        self.preprocessor = preprocessor
        self.sequence_length = sequence_length
        self.max_images = max_images
        self.image_dir = image_dir
        self.task_loss_weights = task_loss_weights or {}
        self.phrase_loss_weight = phrase_loss_weight
        if phrase_loss_weight != 1.0:
            tokenizer = preprocessor.tokenizer
            self.ref_ids = (
                tokenizer.token_to_id("<ref>"),
                tokenizer.token_to_id("</ref>"),
            )

    def __call__(self, item):
        index, example = item
        example = readers.to_loader_form(example, index, self.image_dir)
        name = example.get("id", index)
        if "conversations" in example:
            inputs = {key: example[key] for key in ("conversations", "images")}
        else:
            inputs = {
                key: example[key] for key in ("prompts", "responses", "images")
            }
        try:
            # `_call` (`call`'s body; labels stay at every position until
            # the batch is selected) rather than `__call__`, whose error
            # wrapping would bury the preprocessor's message in a call
            # report.
            with no_convert_scope():
                x, y, sample_weight = self.preprocessor._call(
                    inputs, sequence_length=self.sequence_length, select=False
                )
        except FileNotFoundError as error:
            raise readers.BadSampleError(
                name, "missing_image", _strip_index(error)
            ) from None
        except ValueError as error:
            reason = (
                "corrupt_image" if "not an image" in str(error) else "invalid"
            )
            raise readers.BadSampleError(
                name, reason, _strip_index(error)
            ) from None
        task = example.get("task")
        y = np.asarray(y)
        weight = np.asarray(sample_weight, "float32")
        weight = weight * self.task_loss_weights.get(task, 1.0)
        if self.phrase_loss_weight != 1.0:
            inside = phrase_labels(y, *self.ref_ids)
            weight = np.where(inside, weight * self.phrase_loss_weight, weight)
        record = {
            "name": name,
            "task": task,
            "token_ids": np.asarray(x["token_ids"]),
            "padding_mask": np.asarray(x["padding_mask"]),
            "y": y,
            "sample_weight": weight,
        }
        if "images" in x:
            images = np.asarray(x["images"])
            if len(images) > self.max_images:
                raise readers.BadSampleError(
                    name,
                    "invalid",
                    f"it has {len(images)} images, more than `max_images` "
                    f"= {self.max_images} image slots per batch row.",
                )
            record["images"] = images
        return record


def phrase_labels(labels, ref_id, end_ref_id):
    """Where `labels` (a sample's next-token labels at every position)
    are tokens of a `<ref>...</ref>` phrase: after a `<ref>` label and up
    to, not including, its `</ref>`.

    Args:
        labels: an int array `(sequence_length,)`.
        ref_id: the id of `<ref>`.
        end_ref_id: the id of `</ref>`.

    Returns:
        A bool array of the same shape.
    """
    labels = np.asarray(labels)
    opens = np.cumsum(labels == ref_id)
    closes = np.cumsum(labels == end_ref_id)
    # Tags do not nest: inside a phrase one more `<ref>` than `</ref>`
    # has been seen.
    inside = opens > closes
    return inside & (labels != ref_id)


def _strip_index(error):
    """The preprocessor's message without its own `sample 0: ` prefix."""
    message = str(error)
    prefix = "sample 0: "
    return message[len(prefix):] if message.startswith(prefix) else message


class _Row:
    """A sample record -> an unpacked row `(x, y, sample_weight)`."""

    def __init__(self, max_images, image_shape):
        self.max_images = max_images
        self.image_shape = image_shape

    def __call__(self, record):
        x = {
            "token_ids": record["token_ids"].astype("int32"),
            "padding_mask": record["padding_mask"].astype("int32"),
        }
        if self.image_shape is not None:
            x["images"] = pad_images(
                record["images"], self.max_images, self.image_shape
            )
        return x, record["y"].astype("int32"), record["sample_weight"]


class _PackWindow(grain.experimental.FlatMapTransform):
    """A window of sample records -> packed rows (same-task rows)."""

    def __init__(self, window, packer_arguments):
        self.max_fan_out = window
        self.packer_arguments = packer_arguments

    def flat_map(self, records):
        packer = RowPacker(*self.packer_arguments)
        for record in records:
            packer.add(record, record["name"], record["task"])
        return packer.rows()


class _Observe:
    """Counts what the consumer receives (in the consuming process)."""

    def __init__(self, stats, image_start_token_id, max_images):
        self.stats = stats
        self.image_start_token_id = image_start_token_id
        self.max_images = max_images

    def __call__(self, batch):
        # Plain copies: batches from worker processes live in shared memory
        # that is released as soon as they are dropped.
        batch = keras.tree.map_structure(np.array, batch)
        x, _, _ = batch
        segments = x["padding_mask"]
        self.stats.samples += int(segments.max(axis=-1).sum())
        self.stats.rows += segments.shape[0]
        self.stats.tokens += int(np.count_nonzero(segments))
        self.stats.capacity += segments.size
        self.stats.images += int(
            np.count_nonzero(x["token_ids"] == self.image_start_token_id)
        )
        self.stats.image_slots += segments.shape[0] * self.max_images
        return batch


class _SelectLossPositions:
    """Labels that carry loss -> `num_positions` slots per row."""

    def __init__(self, num_positions):
        self.num_positions = num_positions

    def __call__(self, batch):
        return select_loss_positions(*batch, self.num_positions)


class QwenVLDataLoader:
    """Raw examples -> fixed-shape `(x, y, sample_weight)` batches.

    Args:
        examples: the raw examples: a list (or any sequence, e.g. a
            `SyntheticSource`), a dict of columns, a `grain.MapDataset` or
            `grain.IterDataset`, or a `tf.data.Dataset`. Elements are single
            examples or batches of them (lists, dicts of columns).
        preprocessor: a `QwenVLCausalLMPreprocessor`.
        batch_size: rows per batch.
        sequence_length: the row length; defaults to the preprocessor's.
        max_images: image slots per row. Defaults to the source's
            `max_images` attribute, else the largest count of a list's
            examples, else 1 (an example with more images is an error
            naming it); when packing, to at least the number of image
            spans (`image_span_length` + 2 tokens each) that fit in a row. 0 for a text-only
            preprocessor. Every slot costs a vision-encoder pass, used or
            not, so keep it as small as the data allows.
        pack: whether to pack several samples of one task into each row
            (`padding_mask` then holds segment ids).
        packing_window: samples considered together when packing; rows
            are filled first-fit within a window. Defaults to
            `4 * batch_size`.
        shuffle: whether to shuffle a random-access source; defaults to
            `True` for one and `False` for streams (Grain `IterDataset`s
            and `tf.data` keep their order; `True` is then an error).
        seed: the shuffling seed.
        repeat: `True` to repeat a random-access source forever, or a
            number of passes; each pass is reshuffled (use
            `steps_per_epoch` in `fit()`).
        start_pass: the pass to start from (a random-access source): the
            batches are those an uninterrupted run reads from that pass
            on, as when `fit()` resumes at `initial_epoch`.
        drop_remainder: whether to drop a last, smaller batch (keeps the
            batch shape static).
        num_workers: worker processes that preprocess (and pack); 0 runs
            the pipeline in this process. Needs a picklable, random-access
            source.
        image_dir: the folder of relative image paths, or `None`.
        task_loss_weights: `{task: weight}`: the loss weight of every
            target token of the examples of a task (their `task` field;
            1 for the others), e.g. `{"caption": 3.0}` to make a task
            whose responses are a few tokens count as much as a task
            with long ones. Weights are >= 0.
        phrase_loss_weight: a factor (>= 0) on the loss weight of the
            target tokens of each `<ref>...</ref>` phrase (the words that
            name what a box holds, or that OCR reads), on top of the
            task's weight. A phrase is a few tokens against its box's or
            quad's dozens of coordinate digits, whose loss stays high (a
            box's exact pixels are uncertain), so at 1 the digits carry
            most of a grounding or OCR sample's gradient.

    A bad example raises a `readers.BadSampleError` naming it (its id,
    else its index in the source) when it is reached. To skip and count
    bad samples instead, read them first with `readers.read_examples` or
    `readers.read_finetune_json` and `on_error="skip"`.

    Attributes:
        stats: a `PackingStats` of the batches handed out so far (rows,
            samples, real tokens, image slots used; `stats.efficiency`).

    Example:
    ```python
    source = SyntheticSource(10_000, seed=0)
    loader = QwenVLDataLoader(source, lm.preprocessor, batch_size=16,
                              pack=True, num_workers=2, repeat=True)
    lm.fit(loader.dataset(), steps_per_epoch=500, epochs=4)
    print(loader.stats)
    ```
    """

    def __init__(
        self,
        examples,
        preprocessor,
        batch_size=8,
        sequence_length=None,
        max_images=None,
        pack=False,
        packing_window=None,
        shuffle=None,
        seed=0,
        repeat=False,
        start_pass=0,
        drop_remainder=True,
        num_workers=0,
        image_dir=None,
        task_loss_weights=None,
        phrase_loss_weight=1.0,
    ):
        if batch_size < 1:
            raise ValueError(
                f"`batch_size` must be >= 1. Received: {batch_size}"
            )
        if isinstance(examples, dict) and _is_batch(examples):
            examples = split_batch(examples)
        self.examples = examples
        self.preprocessor = preprocessor
        self.batch_size = int(batch_size)
        self.sequence_length = int(
            sequence_length or preprocessor.sequence_length
        )
        converter = preprocessor.image_converter
        max_images_given = max_images
        if converter is None:
            self.image_shape = None
            max_images = 0
        else:
            self.image_shape = tuple(converter.image_size) + (3,)
            if max_images is None:
                max_images = getattr(examples, "max_images", None)
            if max_images is None and isinstance(examples, (list, tuple)):
                max_images = max(map(_count_images, examples), default=0)
            if max_images is None:
                max_images = 1
            if pack and max_images_given is None:
                # As many images as whole spans (with their tags) fit a row.
                span = preprocessor.tokenizer.image_span_length
                spans = self.sequence_length // (span + 2)
                max_images = max(max_images, spans)
        self.max_images = int(max_images)
        self.pack = bool(pack)
        self.packing_window = int(packing_window or 4 * self.batch_size)
        self.random_access = _is_random_access(examples)
        if shuffle is None:
            shuffle = self.random_access
        if (shuffle or repeat or start_pass) and not self.random_access:
            raise ValueError(
                "`shuffle`, `repeat` and `start_pass` need a random-access "
                "source (a list, a sequence or a grain.MapDataset); shuffle "
                "and repeat a stream (grain.IterDataset, tf.data) yourself."
            )
        if num_workers and not self.random_access:
            raise ValueError(
                "Worker processes need a random-access source (a list, a "
                "sequence or a grain.MapDataset) to split between them."
            )
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.repeat = repeat if repeat is True else int(repeat)
        self.start_pass = int(start_pass)
        self.drop_remainder = bool(drop_remainder)
        self.num_workers = int(num_workers)
        self.image_dir = image_dir
        self.task_loss_weights = dict(task_loss_weights or {})
        negative = {
            task: weight
            for task, weight in self.task_loss_weights.items()
            if not weight >= 0
        }
        if negative:
            raise ValueError(
                f"`task_loss_weights` must be >= 0. Received: {negative}"
            )
        if not phrase_loss_weight >= 0:
            raise ValueError(
                "`phrase_loss_weight` must be >= 0. Received: "
                f"{phrase_loss_weight}"
            )
        self.phrase_loss_weight = float(phrase_loss_weight)
        self.num_loss_positions = getattr(
            preprocessor, "num_loss_positions", None
        )
        self.stats = PackingStats()
        self._read_options = grain.ReadOptions(
            num_threads=1, prefetch_buffer_size=_READ_AHEAD
        )

    def _examples(self):
        """A Grain dataset of `(index, example)`, single examples."""
        source = self.examples
        if tf is not None and isinstance(source, tf.data.Dataset):
            source = _TFExamples(source)
        elif not isinstance(source, (grain.MapDataset, grain.IterDataset)):
            source = grain.MapDataset.source(source)
        if self.random_access:
            source = source.map_with_index(_indexed)
            return source.shuffle(self.seed) if self.shuffle else source
        if isinstance(source, grain.MapDataset):
            source = source.to_iter_dataset(self._read_options)
        source = grain.experimental.FlatMapIterDataset(source, _SplitBatches())
        return source.map_with_index(_indexed)

    @property
    def num_batches(self):
        """Batches per pass over the data when known without reading it
        (unpacked random-access data), else `None`."""
        if self.pack or not self.random_access:
            return None
        count = len(self.examples)
        if self.drop_remainder:
            return count // self.batch_size
        return -(-count // self.batch_size)

    def dataset(self):
        """The batches as a `grain.IterDataset` (a new pipeline per call).

        Each element is `(x, y, sample_weight)` of numpy arrays with the
        shapes of the module docstring. It can be passed to `fit()`
        (through `RawExamplesMixin`) on every backend.
        """
        tokenizer = self.preprocessor.tokenizer
        # Packing needs one position more than the row, to see truncation.
        length = self.sequence_length + 1 if self.pack else self.sequence_length
        ds = self._examples().map(
            _Preprocess(
                self.preprocessor,
                length,
                self.max_images,
                self.image_dir,
                self.task_loss_weights,
                self.phrase_loss_weight,
            )
        )
        if self.pack:
            ds = ds.batch(self.packing_window, batch_fn=list)
        else:
            ds = ds.map(_Row(self.max_images, self.image_shape))
            ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
        if isinstance(ds, grain.MapDataset):
            per_pass = len(ds)
            if self.repeat:
                # Each pass is reshuffled (Grain reseeds upstream shuffles).
                passes = None if self.repeat is True else int(self.repeat)
                ds = ds.repeat(passes)
            if self.start_pass:
                ds = ds[self.start_pass * per_pass :]
            ds = ds.to_iter_dataset(self._read_options)
        if self.pack:
            packer_arguments = (
                self.sequence_length,
                self.max_images,
                tokenizer.pad_token_id,
                self.image_shape,
            )
            ds = grain.experimental.FlatMapIterDataset(
                ds, _PackWindow(self.packing_window, packer_arguments)
            )
            ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
        if self.num_workers:
            # Grain's worker start reads an absl flag, which raises in
            # programs that never parse flags (google/grain#1355): defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.num_workers,
                    per_worker_buffer_size=_READ_AHEAD,
                )
            )
        ds = ds.map(
            _Observe(
                self.stats, tokenizer.image_start_token_id, self.max_images
            )
        )
        if self.num_loss_positions is not None:
            ds = ds.map(_SelectLossPositions(self.num_loss_positions))
        ds._qwenvl_batches = True  # read by `fit_loader`
        return ds

    def __iter__(self):
        return iter(self.dataset())

    def tf_dataset(self):
        """The batches as a `tf.data.Dataset` (static shapes, prefetched).

        The Grain pipeline runs underneath (workers included), read through
        `tf.data.Dataset.from_generator`.
        """
        if tf is None:
            raise ImportError("`tf_dataset()` needs TensorFlow installed.")
        batch = self.batch_size if self.drop_remainder else None
        row = tf.TensorSpec((batch, self.sequence_length), "int32")
        x = {"token_ids": row, "padding_mask": row}
        if self.image_shape is not None:
            x["images"] = tf.TensorSpec(
                (batch, self.max_images) + self.image_shape, "float32"
            )
        labels = self.num_loss_positions or self.sequence_length
        if self.num_loss_positions is not None:
            x["loss_positions"] = tf.TensorSpec((batch, labels), "int32")
        weights = tf.TensorSpec((batch, labels), "float32")
        y = tf.TensorSpec((batch, labels), "int32")
        return tf.data.Dataset.from_generator(
            lambda: iter(self.dataset()), output_signature=(x, y, weights)
        ).prefetch(tf.data.AUTOTUNE)


# fit() with raw examples.


def is_preprocessed(x):
    """Whether `x` (one batch's features) is already preprocessed."""
    return isinstance(x, dict) and "token_ids" in x


def _is_dataset(x):
    return isinstance(x, (grain.MapDataset, grain.IterDataset)) or (
        tf is not None and isinstance(x, tf.data.Dataset)
    )


def _holds_preprocessed(dataset):
    """Whether a Grain or tf.data dataset yields preprocessed batches."""
    if getattr(dataset, "_qwenvl_batches", False):
        return True
    if tf is not None and isinstance(dataset, tf.data.Dataset):
        spec = dataset.element_spec
        return is_preprocessed(spec[0] if isinstance(spec, tuple) else spec)
    if isinstance(dataset, grain.MapDataset):
        element = dataset[0]
    else:
        element = next(iter(dataset))
    if isinstance(element, tuple):
        element = element[0]
    return is_preprocessed(element)


def fit_loader(
    preprocessor, x, batch_size=None, shuffle=True, passes=1, start_pass=0
):
    """A loader for what `fit()` or `evaluate()` received, if it is raw.

    Args:
        preprocessor: the task's preprocessor (or `None`).
        x: the `x` (or `validation_data`) received.
        batch_size: rows per batch (default 32, as `fit()`).
        shuffle: whether to shuffle random-access data.
        passes: the passes that will be made over the data (`epochs`); a
            random-access source is repeated that often, reshuffled each
            time, so that one iterator serves all epochs.
        start_pass: the first pass read (`initial_epoch`).

    Returns:
        A `QwenVLDataLoader` (no dropped remainder) when `x` holds raw
        examples (a list, tuple or other random-access source such as a
        `SyntheticSource` of strings or example dicts, a dict of columns,
        or a Grain or `tf.data` dataset of them), else `None`
        (preprocessed data, arrays, or no preprocessor): then `fit()`
        proceeds as usual.
    """
    if preprocessor is None or x is None:
        return None
    if _is_dataset(x):
        raw = not _holds_preprocessed(x)
    elif isinstance(x, dict):
        raw = _is_batch(x) and not is_preprocessed(x)
    elif _is_random_access(x):
        first = x[0] if len(x) else None
        raw = isinstance(first, (str, dict)) and not is_preprocessed(first)
    else:
        raw = False
    if not raw:
        return None
    random_access = _is_random_access(x)
    return QwenVLDataLoader(
        x,
        preprocessor,
        batch_size=batch_size or 32,
        shuffle=shuffle and random_access,
        repeat=passes if random_access else False,
        start_pass=start_pass if random_access else 0,
        drop_remainder=False,
    )


class RawExamplesMixin:
    """Lets `fit()` and `evaluate()` of a causal LM take raw examples.

    Mixed into `QwenVLCausalLM` before keras-hub's `CausalLM`, it routes
    raw examples (see `fit_loader`) through `QwenVLDataLoader` (static
    shapes, Python preprocessing on every backend), declares the number of
    steps when it is known, and lets batches that are already preprocessed
    (the loader's, or any `{"token_ids": ...}` input) through without
    preprocessing them again.
    """

    def fit(
        self, x=None, y=None, batch_size=None, validation_data=None, **kwargs
    ):
        epochs = kwargs.get("epochs", 1)
        loader = None
        if y is None:
            loader = fit_loader(
                self.preprocessor,
                x,
                batch_size,
                kwargs.get("shuffle", True),
                epochs,
                kwargs.get("initial_epoch", 0),
            )
        if loader is not None:
            x = loader.dataset()
            if kwargs.get("steps_per_epoch") is None and loader.num_batches:
                kwargs["steps_per_epoch"] = loader.num_batches
        if _is_dataset(x):
            # Datasets shuffle themselves (the loader did); Keras would only
            # warn that it ignores `shuffle`.
            kwargs.setdefault("shuffle", False)
        validation = fit_loader(
            self.preprocessor, validation_data, batch_size, False, epochs
        )
        if validation is not None:
            validation_data = validation.dataset()
            steps = validation.num_batches
            if kwargs.get("validation_steps") is None and steps:
                kwargs["validation_steps"] = steps
        return super().fit(
            x,
            y=y,
            batch_size=None if loader is not None else batch_size,
            validation_data=validation_data,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        if y is None and not kwargs.get("_use_cached_eval_dataset", False):
            loader = fit_loader(self.preprocessor, x, batch_size, False)
            if loader is not None:
                x, batch_size = loader.dataset(), None
                if kwargs.get("steps") is None and loader.num_batches:
                    kwargs["steps"] = loader.num_batches
        return super().evaluate(x, y=y, batch_size=batch_size, **kwargs)

    def preprocess_samples(self, x, y=None, sample_weight=None):
        if is_preprocessed(x):
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        return super().preprocess_samples(x, y, sample_weight)
