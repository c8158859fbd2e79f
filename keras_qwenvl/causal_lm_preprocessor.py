"""QwenVLCausalLMPreprocessor: texts, images and conversations -> batches."""

import os

import keras
import numpy as np
from keras_hub.src.models.causal_lm_preprocessor import CausalLMPreprocessor
from keras_hub.src.utils.tensor_utils import (
    convert_preprocessing_outputs_python,
)
from keras_hub.src.utils.tensor_utils import in_tf_function

from keras_qwenvl import boxes
from keras_qwenvl import chat_format
from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.presets import QwenVLPresetMixin
from keras_qwenvl.tokenizer import QwenVLTokenizer


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLCausalLMPreprocessor(QwenVLPresetMixin, CausalLMPreprocessor):
    """Qwen-VL causal LM preprocessor: tokens, images, labels and weights.

    Turns texts with `<img>` tags (and their images), prompt/response pairs
    or ChatML conversations into the inputs of `QwenVLBackbone`
    (`token_ids`, `padding_mask`, `images`), the next-token labels `y` and
    the `sample_weight` that marks which labels carry loss.

    Every `<img>...</img>` of a sample becomes an image span of the
    tokenizer's `image_span_length` positions (256); the sample's k-th tag
    takes its k-th image. When images are
    passed with a sample they fill its tags in order (the tag's text is
    kept as written and may be empty); when none are passed, each tag's
    text is a path (relative to `image_dir` when that is set) loaded with
    the image converter, as the original code does. `images` has shape
    `(batch, max_images, S, S, 3)`, `max_images` the largest number of
    images of a sample (0 for text only); unused slots are zeros.

    Inputs to `call()`, each a single sample or a batch:
    - a string or list of strings: whole texts; every real next token
      carries loss.
    - `{"prompts": ..., "responses": ..., "images": ...}`: the loss is on
      the response and the end token (keras-hub's convention).
    - a conversation in the original fine-tuning JSON form,
      `{"id": ..., "conversations": [{"from": "user", "value": ...},
      {"from": "assistant", "value": ...}, ...], "images": ...}` (`"role"`
      and `"content"` work too), a list of those, or
      `{"conversations": [conversation, ...], "images": [...]}`. It is
      written as ChatML with `system_prompt`, and the loss is only on each
      assistant reply with its closing `<|im_end|>` and newline. It ends at
      its last `<|im_end|>\\n` (no end token), as the original does.

    "images" is optional: a list of images per sample (arrays, PIL images or
    paths), or for a single sample its list or one image. Labels carry no
    loss on padding or anywhere inside an image span. Sequences are right
    padded with `tokenizer.pad_token_id`. Plain text is truncated to
    `sequence_length` as keras-hub does (the end token kept), but a sample
    whose image span would be cut or dropped is an error. Nothing is
    silently dropped: every bad sample raises a `ValueError` (or
    `FileNotFoundError`) whose message starts with `sample {index}:`.

    This layer runs in Python (tiktoken, PIL); map it over Python data or a
    Grain dataset. Inside `tf.data` or a `tf.function` it raises a
    `RuntimeError` rather than tracing.

    Args:
        tokenizer: a `QwenVLTokenizer`.
        image_converter: a `QwenVLImageConverter`, or `None` for a text-only
            model (then there is no `images` output and `<img>` is an error).
        sequence_length: the length of the packed inputs.
        add_end_token: whether texts and prompt/response pairs end with the
            end token `<|endoftext|>` (with loss).
        image_dir: folder for relative image paths (in tags or passed as
            strings), or `None`.
        system_prompt: the system turn of ChatML conversations.
        num_loss_positions: `None` (labels at every position), or an int k:
            each row's labels that carry loss are gathered into k slots, and
            `x["loss_positions"]` (b, k) tells `QwenVLCausalLM` to compute
            logits only there (see `select_loss_positions`). Training then
            skips the lm_head on image spans, prompts and padding, which at
            Qwen's vocabulary is most of the model's work. A row with more
            than k such labels is an error.

    Call arguments:
        x: the inputs, as above.
        y: must be `None`; labels are made from `x`.
        sample_weight: must be `None`; weights are made from `x`.
        sequence_length: overrides `sequence_length` for this call.
        image_dir: overrides `image_dir` for this call.

    Examples:
    ```python
    preprocessor = QwenVLCausalLMPreprocessor(
        QwenVLTokenizer("qwen.tiktoken"),
        QwenVLImageConverter(image_size=(448, 448)),
        sequence_length=512,
    )
    # The tag's text is the path (under `image_dir`).
    x, y, sample_weight = preprocessor(
        "Picture 1: <img>coffee.png</img>\\nA cup of coffee.",
        image_dir="images",
    )
    # Images passed with the prompts fill empty tags.
    x, y, sample_weight = preprocessor({
        "prompts": ["<img></img>What is it?"],
        "responses": ["A rocket."],
        "images": [[rocket_array]],
    })
    # The original fine-tuning format.
    x, y, sample_weight = preprocessor([{
        "id": "identity_0",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>cat.jpg</img>\\nWhat?"},
            {"from": "assistant", "value":
                "<ref>A cat</ref><box>(1,2),(5,6)</box>"},
        ],
    }])
    ```
    """

    backbone_cls = QwenVLBackbone
    tokenizer_cls = QwenVLTokenizer
    image_converter_cls = QwenVLImageConverter

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=1024,
        add_end_token=True,
        image_dir=None,
        system_prompt=chat_format.DEFAULT_SYSTEM_PROMPT,
        num_loss_positions=None,
        **kwargs,
    ):
        super().__init__(
            tokenizer=tokenizer,
            sequence_length=sequence_length,
            add_start_token=False,  # Qwen has no start token.
            add_end_token=add_end_token,
            **kwargs,
        )
        self.image_converter = image_converter
        self.image_dir = image_dir
        self.system_prompt = system_prompt
        if num_loss_positions is not None and not (
            isinstance(num_loss_positions, (int, np.integer))
            and 0 < num_loss_positions
        ):
            raise ValueError(
                "`num_loss_positions` must be None or a positive int. "
                f"Received: {num_loss_positions!r}"
            )
        self.num_loss_positions = num_loss_positions
        # Packing is done here in numpy; there is no packer layer to build.
        # Built from the start: a task whose layers are not all built traces
        # the whole model again at every `train_on_batch` (Keras'
        # `_symbolic_build`).
        self.built = True

    # Input normalization.

    def _samples(self, x):
        """Reads any `call()` input into samples.

        Returns:
            `(samples, batched)`: `samples` a list of `(segments, images,
            add_end_token)`, `segments` a list of `(text, carries_loss)`,
            `images` a list of images or `None` (load the tags' paths).
        """
        if isinstance(x, dict) and "conversations" in x:
            conversations = x["conversations"]
            batched = bool(conversations) and not isinstance(
                conversations[0], dict
            )
            if not batched:
                conversations = [conversations]
            images = _split_images(x.get("images"), len(conversations), batched)
            samples = [
                (self._conversation(conversation, index), sample_images, False)
                for index, (conversation, sample_images) in enumerate(
                    zip(conversations, images)
                )
            ]
            return samples, batched
        if isinstance(x, dict) and "prompts" in x:
            if "responses" not in x:
                raise ValueError(
                    "A dict input with 'prompts' needs 'responses' for "
                    "training (`generate_preprocess()` takes prompts alone). "
                    f"Received keys: {sorted(x)}"
                )
            prompts, batched = _text_batch(x["prompts"], "prompts")
            responses, _ = _text_batch(x["responses"], "responses")
            if len(responses) != len(prompts):
                raise ValueError(
                    f"{len(prompts)} prompts but {len(responses)} responses; "
                    "pass one response per prompt."
                )
            images = _split_images(x.get("images"), len(prompts), batched)
            samples = [
                ([(prompt, False), (response, True)], imgs, self.add_end_token)
                for prompt, response, imgs in zip(prompts, responses, images)
            ]
            return samples, batched
        if isinstance(x, dict):
            raise ValueError(
                "A dict input needs 'prompts' and 'responses', or "
                f"'conversations'. Received keys: {sorted(x)}"
            )
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            samples = []
            for index, sample in enumerate(x):
                if not (isinstance(sample, dict) and "conversations" in sample):
                    raise ValueError(
                        f"sample {index}: a list of dicts must hold "
                        "conversations, `{'conversations': [...], ...}`. "
                        f"Received: {sample!r}"
                    )
                segments = self._conversation(sample["conversations"], index)
                images = _split_images(sample.get("images"), 1, False)[0]
                samples.append((segments, images, False))
            return samples, True
        texts, batched = _text_batch(x, "x")
        samples = [([(text, True)], None, self.add_end_token) for text in texts]
        return samples, batched

    def _conversation(self, conversation, index):
        try:
            return chat_format.conversation_segments(
                conversation, system_prompt=self.system_prompt
            )
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from None

    # One sample: tokens, loss flags, images.

    def _encode(self, index, segments, images, image_dir, prompt=False):
        """Token ids, per-token loss flags and image pixels of one sample.

        Each segment is tokenized on its own and the ids concatenated.

        Args:
            index: the sample's index, for error messages.
            segments: a list of `(text, carries_loss)`.
            images: the sample's images, or `None` to load the tags' paths.
            image_dir: folder of relative image paths, or `None`.
            prompt: whether the text is a generation prompt (it may end
                with an open `<box>` for the model to complete).

        Returns:
            `(ids, targets, pixels)`: lists of ints and of bools of the same
            length (whether each token, as a label, carries loss), and
            float32 pixels `(num_images, S, S, 3)` (`None` without an image
            converter).
        """
        try:
            tags = []
            for text, _ in segments:
                boxes.validate_text_boxes(text, allow_open_end=prompt)
                tags += chat_format.find_image_tags(text)
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from None
        ids, targets = [], []
        for text, carries_loss in segments:
            if not text:
                continue
            try:
                text_ids = self.tokenizer.tokenize(text)
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from None
            ids += text_ids
            targets += [carries_loss] * len(text_ids)
        pixels = self._load_images(index, tags, images, image_dir)
        return ids, targets, pixels

    def _load_images(self, index, tags, images, image_dir):
        """The sample's images, one per `<img>` tag, as float32 pixels."""
        if tags and self.image_converter is None:
            raise ValueError(
                f"sample {index}: the text has {len(tags)} `<img>` tags but "
                "this preprocessor has no image converter (text-only model)."
            )
        images = chat_format.images_for_tags(tags, images, f"sample {index}")
        if self.image_converter is None:
            return None
        size = tuple(self.image_converter.image_size)
        pixels = np.zeros((len(images),) + size + (3,), dtype="float32")
        for number, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)) and image_dir:
                image = os.path.join(image_dir, image)
            try:
                pixels[number] = keras.ops.convert_to_numpy(
                    self.image_converter(image)
                )
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(
                    f"sample {index}, image {number}: {error}"
                ) from None
        return pixels

    def _check_spans_fit(self, index, ids, length):
        """Raises if an image span of `ids` does not end before `length`."""
        ids = np.asarray(ids)
        ends = np.flatnonzero(ids == self.tokenizer.image_end_token_id)
        if ends.size and ends[-1] >= length:
            starts = np.flatnonzero(ids == self.tokenizer.image_start_token_id)
            first = int(np.argmax(ends >= length))
            raise ValueError(
                f"sample {index}: image {first} spans tokens "
                f"{starts[first]}-{ends[first]}, which does not fit in "
                f"sequence_length={length} (the sample has {len(ids)} "
                "tokens); image spans are never truncated. Raise "
                "`sequence_length` or shorten the text."
            )

    def _image_span_mask(self, token_ids):
        """Bool per token: strictly between an `<img>` and its `</img>`."""
        is_start = token_ids == self.tokenizer.image_start_token_id
        is_end = token_ids == self.tokenizer.image_end_token_id
        opened = np.cumsum(is_start, axis=-1) > np.cumsum(is_end, axis=-1)
        return opened & ~is_start

    def _pack(self, rows, length, pixels):
        """Right-pads id rows to `length`: token ids, padding mask, images."""
        token_ids = np.full(
            (len(rows), length), self.tokenizer.pad_token_id, dtype="int32"
        )
        padding_mask = np.zeros((len(rows), length), dtype="bool")
        for row, ids in enumerate(rows):
            token_ids[row, : len(ids)] = ids
            padding_mask[row, : len(ids)] = True
        packed = {"token_ids": token_ids, "padding_mask": padding_mask}
        if self.image_converter is not None:
            size = tuple(self.image_converter.image_size)
            max_images = max((len(p) for p in pixels), default=0)
            images = np.zeros(
                (len(rows), max_images) + size + (3,), dtype="float32"
            )
            for row, sample_pixels in enumerate(pixels):
                images[row, : len(sample_pixels)] = sample_pixels
            packed["images"] = images
        return packed

    def _check_python_path(self, method):
        if in_tf_function():
            raise RuntimeError(
                f"`{type(self).__name__}.{method}()` runs in Python (tiktoken "
                "and PIL) and cannot be traced inside `tf.data` or a "
                "`tf.function`. Map it over Python data or a Grain dataset "
                "instead."
            )

    # Public API.

    def call(
        self,
        x,
        y=None,
        sample_weight=None,
        sequence_length=None,
        image_dir=None,
    ):
        self._check_python_path("call")
        if y is not None or sample_weight is not None:
            raise ValueError(
                "`QwenVLCausalLMPreprocessor` makes the labels and sample "
                "weights from `x`; `y` and `sample_weight` must be `None`. "
                f"Received: y={y!r}, sample_weight={sample_weight!r}"
            )
        return self._call(x, sequence_length, image_dir)

    def _call(self, x, sequence_length=None, image_dir=None, select=True):
        """`call` without its argument checks; `select=False` keeps labels
        at every position (the data loader selects per batch, after
        packing)."""
        sequence_length = sequence_length or self.sequence_length
        image_dir = image_dir or self.image_dir
        samples, batched = self._samples(x)
        # Pack one token more than the input: labels are tokens 1..L.
        total_length = sequence_length + 1
        rows, target_rows, pixels = [], [], []
        for index, (segments, images, add_end_token) in enumerate(samples):
            ids, targets, sample_pixels = self._encode(
                index, segments, images, image_dir
            )
            self._check_spans_fit(index, ids, sequence_length)
            # Truncate the text, keeping room for the end token.
            keep = total_length - 1 if add_end_token else total_length
            ids, targets = ids[:keep], targets[:keep]
            if add_end_token:
                ids.append(self.tokenizer.end_token_id)
                targets.append(True)
            rows.append(ids)
            target_rows.append(targets)
            pixels.append(sample_pixels)
        packed = self._pack(rows, total_length, pixels)
        token_ids, real = packed["token_ids"], packed["padding_mask"]
        is_target = np.zeros_like(real)
        for row, targets in enumerate(target_rows):
            is_target[row, : len(targets)] = targets
        in_span = self._image_span_mask(token_ids)
        # A label carries loss when it is a real target token outside image
        # spans, predicted from a position outside image spans.
        sample_weight = (
            is_target[:, 1:] & real[:, 1:] & ~in_span[:, 1:] & ~in_span[:, :-1]
        ).astype("float32")
        x = {
            "token_ids": token_ids[:, :-1],
            "padding_mask": real[:, :-1],
        }
        if "images" in packed:
            x["images"] = packed["images"]
        y = token_ids[:, 1:]
        if select and self.num_loss_positions is not None:
            x, y, sample_weight = select_loss_positions(
                x, y, sample_weight, self.num_loss_positions
            )
        if not batched:
            x = {key: value[0] for key, value in x.items()}
            y, sample_weight = y[0], sample_weight[0]
        x, y, sample_weight = convert_preprocessing_outputs_python(
            (x, y, sample_weight)
        )
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def generate_preprocess(self, x, sequence_length=None, image_dir=None):
        """Tokenizes prompts (and their images) for `generate()`.

        No end token is added; rows are right-padded. A prompt longer than
        `sequence_length` is an error (never truncated).

        Args:
            x: a string, a list of strings, or `{"prompts": ...,
                "images": ...}` with "images" optional (per prompt a list
                of images, see the class docstring).
            sequence_length: the padded length; defaults to
                `self.sequence_length`.
            image_dir: overrides `image_dir` for this call.

        Returns:
            A dict of `token_ids` (int32), `padding_mask` (bool) and, with an
            image converter, `images` (float32 `(batch, max_images, S, S,
            3)`), without the batch axis for a single string prompt.
        """
        self._check_python_path("generate_preprocess")
        sequence_length = sequence_length or self.sequence_length
        image_dir = image_dir or self.image_dir
        if isinstance(x, dict):
            unknown = set(x) - {"prompts", "images"}
            if "prompts" not in x or unknown:
                raise ValueError(
                    "`generate_preprocess()` takes a string, a list of "
                    "strings or a dict with 'prompts' and optionally "
                    f"'images'. Received keys: {sorted(x)}"
                )
            prompts, batched = _text_batch(x["prompts"], "prompts")
            images = _split_images(x.get("images"), len(prompts), batched)
        else:
            prompts, batched = _text_batch(x, "x")
            images = [None] * len(prompts)
        rows, pixels = [], []
        for index, (prompt, sample_images) in enumerate(zip(prompts, images)):
            ids, _, sample_pixels = self._encode(
                index, [(prompt, False)], sample_images, image_dir, prompt=True
            )
            if len(ids) > sequence_length:
                raise ValueError(
                    f"sample {index}: the prompt has {len(ids)} tokens, more "
                    f"than sequence_length={sequence_length}; prompts are "
                    "never truncated. Raise the length or shorten the prompt."
                )
            rows.append(ids)
            pixels.append(sample_pixels)
        packed = self._pack(rows, sequence_length, pixels)
        if not batched:
            packed = {key: value[0] for key, value in packed.items()}
        return convert_preprocessing_outputs_python(packed)

    def generate_postprocess(self, x):
        """Turns generated ids back into text.

        Only positions where `padding_mask` is true are read; stop tokens
        (`<|im_end|>`, `<|im_start|>`, `<|endoftext|>`) are dropped. Image
        spans come back as `<img>X</img>`, and grounding tags (`<ref>`,
        `<box>`, `<quad>`) are kept for `boxes.parse_grounding`.

        Args:
            x: a dict of `token_ids` and `padding_mask`, numpy arrays or
                tensors, of shape `(batch, length)` or `(length,)`.

        Returns:
            A string for one sequence, a list of strings for a batch.
        """
        self._check_python_path("generate_postprocess")
        token_ids = keras.ops.convert_to_numpy(x["token_ids"])
        keep = keras.ops.convert_to_numpy(x["padding_mask"]).astype("bool")
        # The padding id is `<imgpad>`, which fills image spans: padding is
        # read from the mask.
        keep &= ~np.isin(token_ids, self.tokenizer.stop_token_ids)
        if token_ids.ndim == 1:
            return self.tokenizer.detokenize(token_ids[keep].tolist())
        return [
            self.tokenizer.detokenize(row[mask].tolist())
            for row, mask in zip(token_ids, keep)
        ]

    def get_config(self):
        config = super().get_config()
        del config["add_start_token"]  # always False: Qwen has no BOS.
        config.update(
            {
                "image_dir": self.image_dir,
                "system_prompt": self.system_prompt,
                "num_loss_positions": self.num_loss_positions,
            }
        )
        return config


def select_loss_positions(x, y, sample_weight, num_positions):
    """Gather each row's labels that carry loss into `num_positions` slots.

    For `QwenVLCausalLM`, which computes logits only at
    `x["loss_positions"]` when that input is present. Slots past a row's
    last such label point at position 0 with weight 0. The weights are
    scaled by k / t (k = `num_positions`, t the row length), so that Keras'
    default loss reduction, which divides the weighted sum by the number of
    labels, gives the same loss (and gradients) as on all b * t labels;
    weighted metrics do not depend on the scale.

    Args:
        x: a dict with `token_ids` (b, t) and the other model inputs.
        y: the labels, (b, t).
        sample_weight: (b, t); labels with weight 0 carry no loss.
        num_positions: k, at least the largest count of weighted labels of
            a row.

    Returns:
        `(x, y, sample_weight)` with `x["loss_positions"]` (b, k) int32 and
        `y`, `sample_weight` of shape (b, k).

    Raises:
        ValueError: when a row has more than k labels that carry loss.
    """
    y = np.asarray(y)
    sample_weight = np.asarray(sample_weight, dtype="float32")
    if y.ndim != 2 or sample_weight.shape != y.shape:
        raise ValueError(
            "`y` and `sample_weight` must both have shape (batch, length). "
            f"Received: {y.shape} and {sample_weight.shape}"
        )
    rows, length = y.shape
    counts = np.count_nonzero(sample_weight, axis=1)
    if counts.size and counts.max() > num_positions:
        row = int(np.argmax(counts))
        raise ValueError(
            f"Row {row} has {int(counts[row])} labels that carry loss, more "
            f"than `num_loss_positions` = {num_positions}; raise it (at most "
            f"the sequence length, {length}) so that no label is dropped."
        )
    positions = np.zeros((rows, num_positions), "int32")
    weights = np.zeros((rows, num_positions), "float32")
    for row in range(rows):
        kept = np.flatnonzero(sample_weight[row])
        positions[row, : len(kept)] = kept
        weights[row, : len(kept)] = sample_weight[row, kept]
    labels = np.take_along_axis(y, positions, axis=1)
    labels = np.where(weights > 0, labels, 0).astype(y.dtype)
    weights *= num_positions / length
    return {**x, "loss_positions": positions}, labels, weights


def _text_batch(value, name):
    """`(list of str, batched)` from a string or a batch of strings."""
    if isinstance(value, (str, bytes)):
        value, batched = [value], False
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        value, batched = [value.item()], False
    elif isinstance(value, (list, tuple, np.ndarray)):
        value, batched = list(value), True
    else:
        raise ValueError(
            f"`{name}` must be a string or a list of strings. "
            f"Received: {type(value).__name__}"
        )
    texts = []
    for index, text in enumerate(value):
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise ValueError(
                f"sample {index}: `{name}` must hold strings. "
                f"Received: {text!r}"
            )
        texts.append(text)
    return texts, batched


def _is_single_image(value):
    """A path, a PIL image or an `(H, W, C)` array: one image, not a list."""
    return isinstance(value, str) or (
        not isinstance(value, (list, tuple))
        and getattr(value, "ndim", 3) == 3
    )


def _image_list(value):
    """One sample's images as a list, or `None` when none are given."""
    if value is None:
        return None
    if _is_single_image(value):
        return [value]
    images = list(value)
    return images or None


def _split_images(images, batch_size, batched):
    """Per-sample image lists (or `None`) from the "images" input.

    For a batch, "images" has one entry per sample, each a list of images or
    one image. A single sample (or a batch of one, as `generate()` makes of
    a single prompt) may give its images directly: one image or a list.
    """
    if images is None:
        return [None] * batch_size
    if not batched or batch_size == 1:
        if (
            batched
            and isinstance(images, (list, tuple, np.ndarray))
            and len(images) == 1
            and not _is_single_image(images)
        ):
            images = images[0]
        return [_image_list(images)]
    entries = 1 if _is_single_image(images) else len(images)
    if entries != batch_size:
        raise ValueError(
            f"'images' must have one entry per sample: {batch_size} samples "
            f"but {entries} entries."
        )
    return [_image_list(sample_images) for sample_images in images]
