"""Qwen-VL's tokenizer: tiktoken byte-pair encoding plus image spans.

The vocabulary file `qwen.tiktoken` lists one mergeable token per line as
`base64(token bytes) rank`. Special tokens follow the ranks, in the order of
`SPECIAL_TOKENS`, so with the published file (151,643 ranks) `<|endoftext|>`
is 151643 and `<imgpad>` is 151859.

An image reference `<img>X</img>` (X a path or URL) always occupies
`IMAGE_SPAN_LENGTH` = 256 positions between its tags: the UTF-8 bytes of X,
each written as the id equal to the byte's value (0-255, as the original
tokenizer does), then `<imgpad>` up to 256. The model overwrites these 256
positions with the image's features.
"""

import base64
import binascii
import os
import unicodedata

import keras
import numpy as np
import tiktoken
from keras_hub.src.tokenizers.tokenizer import Tokenizer
from keras_hub.src.utils.tensor_utils import convert_to_numpy
from keras_hub.src.utils.tensor_utils import is_int_dtype
from keras_hub.src.utils.tensor_utils import tf

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.presets import QwenVLPresetMixin

VOCABULARY_FILE = "qwen.tiktoken"

# Pre-tokenization regex of the original tokenizer (`PAT_STR`).
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Positions between `<img>` and `</img>` (`IMG_TOKEN_SPAN`; the adapter's
# 256 queries); the default of `QwenVLTokenizer.image_span_length`.
IMAGE_SPAN_LENGTH = 256

IMAGE_TAGS = ("<img>", "</img>")
REF_TAGS = ("<ref>", "</ref>")
BOX_TAGS = ("<box>", "</box>")
QUAD_TAGS = ("<quad>", "</quad>")
IMAGE_PAD = "<imgpad>"

# Special tokens in id order, starting right after the last rank.
SPECIAL_TOKENS = (
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    + tuple(f"<|extra_{i}|>" for i in range(205))
    + REF_TAGS
    + BOX_TAGS
    + QUAD_TAGS
    + IMAGE_TAGS
    + (IMAGE_PAD,)
)
_SPECIAL_INDEX = {token: i for i, token in enumerate(SPECIAL_TOKENS)}

# Tags that `to_list_format` may meet (the original's `IMAGE_ST` plus
# `<|endoftext|>`); any other special token there is an error.
_LIST_FORMAT_SPECIALS = frozenset(
    ("<|endoftext|>",) + REF_TAGS + BOX_TAGS + QUAD_TAGS + IMAGE_TAGS
    + (IMAGE_PAD,)
)
_LIST_FORMAT_KEYS = {
    IMAGE_TAGS[0]: "image",
    REF_TAGS[0]: "ref",
    BOX_TAGS[0]: "box",
    QUAD_TAGS[0]: "quad",
}


def _byte_level_alphabet():
    """One printable character per byte value, as byte-level BPE writes them.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes get the
    characters from U+0100 upward, in byte order. Token strings written this
    way (e.g. `"Ġthe"` for b" the") are unambiguous for any byte sequence.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    alphabet = {}
    spare = 256
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(spare)
            spare += 1
    return [alphabet[byte] for byte in range(256)]


_BYTE_TO_CHAR = _byte_level_alphabet()
_CHAR_TO_BYTE = {char: byte for byte, char in enumerate(_BYTE_TO_CHAR)}


def write_byte_level_vocabulary(path, words=()):
    """Writes a `qwen.tiktoken`-format file whose first 256 ranks are the
    single bytes (rank = byte value), so a vocabulary with no `words` gives
    the special tokens ids 256 and up.

    A vocabulary that needs no download, for demos and models trained from
    scratch; text tokenizes to one id per UTF-8 byte, except `words`: each
    word, alone and after a space, becomes one token through byte-pair
    merges of its prefixes (ranks after the bytes, shorter prefixes first,
    as byte-level BPE requires). A small model trained from scratch learns
    much faster when the words its task turns on (colours, shapes, the words
    it reads) are single tokens rather than 4-8 bytes each.

    Args:
        path: the file to write.
        words: words (letters only, e.g. `["red", "circle"]`) to make
            single tokens.

    Returns:
        `path`.
    """
    pieces = set()
    for word in words:
        if not word or not all(c.isalpha() for c in word):
            raise ValueError(
                f"`words` must be non-empty words of letters; got {word!r}."
            )
        for text in (word, " " + word):
            encoded = text.encode("utf-8")
            pieces.update(encoded[:end] for end in range(2, len(encoded) + 1))
    merges = sorted(pieces, key=lambda piece: (len(piece), piece))
    with open(path, "wb") as file:
        for byte in range(256):
            file.write(base64.b64encode(bytes([byte])) + b" %d\n" % byte)
        for rank, piece in enumerate(merges, start=256):
            file.write(base64.b64encode(piece) + b" %d\n" % rank)
    return path


def _read_ranks(path):
    """Reads a `qwen.tiktoken` file into a `{token bytes: rank}` dict."""
    ranks = {}
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{path}, line {line_number}: expected "
                    f"'<base64 token> <rank>', got {line[:80]!r}."
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"{path}: the ranks must be 0 to {len(ranks) - 1} without gaps "
            "or repeats, because special tokens take the ids after them."
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: every single byte must be a token; missing byte "
            f"values {missing[:10]}{' ...' if len(missing) > 10 else ''}."
        )
    return ranks


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLTokenizer(QwenVLPresetMixin, Tokenizer):
    """Qwen-VL tokenizer: tiktoken BPE with special and image tokens.

    Text is NFC-normalized, split with `SPLIT_PATTERN` and byte-pair encoded
    with the ranks of `qwen.tiktoken`. Every special token in
    `SPECIAL_TOKENS` is recognized in text. `<img>X</img>` becomes `<img>`,
    the UTF-8 byte values of X, `<imgpad>` up to `image_span_length`
    positions (256), `</img>`; decoding turns such a span back into
    `<img>X</img>`.

    Qwen has no start (BOS) token. Generation stops at `<|im_end|>`,
    `<|im_start|>` or `<|endoftext|>` (`stop_token_ids`). The padding id is
    `<imgpad>`, distinct from every stop id, so padded batches never look
    finished.

    Outside `tf.data` and `tf.function` the tokenizer runs in Python: a
    string gives a list of ids, a list (or 1D array/tensor) of strings a list
    of lists. When traced by TensorFlow it runs the same code through
    `tf.py_function`: a scalar string gives a 1D int tensor, a batch a
    `tf.RaggedTensor`.

    Args:
        vocabulary: path to a `qwen.tiktoken` file, or `None` to load it
            later with `load_assets()` (as `from_preset()` does).
        image_span_length: positions between `<img>` and `</img>`; equal
            to the vision encoder's `num_queries` (config
            `visual.n_queries`: 256, the original tokenizer's fixed span).
        dtype: integer dtype of the ids returned on the TensorFlow path.

    Examples:
    ```python
    tokenizer = QwenVLTokenizer("qwen.tiktoken")
    tokenizer.tokenize("Picture 1: <img>cat.png</img>\\nWhat is it?")
    tokenizer.detokenize([9707, 11, 1879, 0])  # "Hello, world!"
    tokenizer.to_list_format("<img>cat.png</img>Describe it.")
    # [{"image": "cat.png"}, {"text": "Describe it."}]
    ```
    """

    backbone_cls = QwenVLBackbone

    def __init__(
        self,
        vocabulary=None,
        image_span_length=IMAGE_SPAN_LENGTH,
        dtype="int32",
        **kwargs,
    ):
        if not is_int_dtype(dtype):
            raise ValueError(
                f"QwenVLTokenizer returns integer ids; got dtype={dtype!r}."
            )
        super().__init__(dtype=dtype, **kwargs)
        self.image_span_length = int(image_span_length)
        self._encoding = None
        self._first_special_id = None
        self._add_special_token("<|endoftext|>", "end_token")
        self._add_special_token(IMAGE_PAD, "pad_token")
        self._add_special_token("<|im_start|>", "im_start_token")
        self._add_special_token("<|im_end|>", "im_end_token")
        for role, tags in (
            ("image", IMAGE_TAGS),
            ("ref", REF_TAGS),
            ("box", BOX_TAGS),
            ("quad", QUAD_TAGS),
        ):
            self._add_special_token(tags[0], f"{role}_start_token")
            self._add_special_token(tags[1], f"{role}_end_token")
        self._add_special_token(IMAGE_PAD, "image_pad_token")
        self.start_token = None
        self.start_token_id = None
        self.file_assets = [VOCABULARY_FILE]
        self.set_vocabulary(vocabulary)
        self.built = True  # no weights (see QwenVLCausalLMPreprocessor)

    # Vocabulary.

    def set_vocabulary(self, vocabulary):
        """Loads the ranks from a `qwen.tiktoken` path (`None` clears them)."""
        if vocabulary is None:
            self._encoding = None
            self._first_special_id = None
        elif isinstance(vocabulary, (str, os.PathLike)):
            ranks = _read_ranks(os.fspath(vocabulary))
            self._first_special_id = len(ranks)
            self._encoding = tiktoken.Encoding(
                "qwen",
                pat_str=SPLIT_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={
                    token: len(ranks) + i
                    for i, token in enumerate(SPECIAL_TOKENS)
                },
            )
        else:
            raise ValueError(
                "`vocabulary` must be a path to a qwen.tiktoken file or None; "
                f"got {type(vocabulary).__name__}."
            )
        for name in self._special_token_attrs:
            token_id = None
            if self._encoding is not None:
                token_id = self.token_to_id(getattr(self, name))
            setattr(self, f"{name}_id", token_id)

    def save_assets(self, dir_path):
        """Writes the ranks to `dir_path/qwen.tiktoken` in the same format."""
        self._check_vocabulary()
        decode = self._encoding.decode_single_token_bytes
        lines = (
            base64.b64encode(decode(rank)) + b" %d\n" % rank
            for rank in range(self._first_special_id)
        )
        with open(os.path.join(dir_path, VOCABULARY_FILE), "wb") as file:
            file.writelines(lines)

    def load_assets(self, dir_path):
        """Loads `dir_path/qwen.tiktoken`."""
        self.set_vocabulary(os.path.join(dir_path, VOCABULARY_FILE))

    def _check_vocabulary(self):
        if self._encoding is None:
            raise ValueError(
                "No vocabulary has been set for QwenVLTokenizer. Pass "
                "`vocabulary` (a path to qwen.tiktoken) when creating it, or "
                "call `load_assets()`."
            )

    def vocabulary_size(self):
        """Number of ids: the ranks plus the special tokens after them."""
        self._check_vocabulary()
        return self._first_special_id + len(SPECIAL_TOKENS)

    def get_vocabulary(self):
        """All tokens as strings, indexed by id (see `id_to_token`)."""
        return [self.id_to_token(i) for i in range(self.vocabulary_size())]

    def id_to_token(self, id):
        """The string of token `id`.

        Mergeable tokens are written in the byte-level alphabet (a space is
        `"Ġ"`, a newline `"Ċ"`), so every byte sequence has a unique string;
        special tokens are their text.
        """
        self._check_id(id)
        if id >= self._first_special_id:
            return SPECIAL_TOKENS[id - self._first_special_id]
        token = self._encoding.decode_single_token_bytes(id)
        return "".join(_BYTE_TO_CHAR[byte] for byte in token)

    def token_to_id(self, token):
        """The id of a token string as `id_to_token` writes it."""
        self._check_vocabulary()
        if token in _SPECIAL_INDEX:
            return self._first_special_id + _SPECIAL_INDEX[token]
        try:
            return self._encoding.encode_single_token(
                bytes(_CHAR_TO_BYTE[char] for char in token)
            )
        except KeyError:
            raise ValueError(
                f"{token!r} is not a token of the vocabulary."
            ) from None

    def _check_id(self, id):
        size = self.vocabulary_size()
        if not 0 <= id < size:
            raise ValueError(
                f"Token id {id} is outside the vocabulary [0, {size})."
            )

    @property
    def stop_token_ids(self):
        """Ids that end generation: `<|im_end|>`, `<|im_start|>`, EOS."""
        return (self.im_end_token_id, self.im_start_token_id, self.end_token_id)

    def _split_tags(self, ids, tag_pairs, strict=True):
        """Splits `ids` into plain runs and closed tag spans, in order.

        As the original's `_replace_closed_tag`: the next opening tag of any
        pair starts a span that ends at the next closing tag of the same
        pair (a span includes both tags).

        Args:
            ids: list of token ids.
            tag_pairs: `(opening, closing)` tag strings.
            strict: whether an opening tag that is never closed raises a
                `ValueError`; otherwise the rest is one plain run.

        Returns:
            A list of `(opening tag or None, ids)` runs.
        """
        closing = {
            self.token_to_id(start): self.token_to_id(end)
            for start, end in tag_pairs
        }
        runs = []
        position = 0
        for start, id in enumerate(ids):
            if start < position or id not in closing:
                continue
            try:
                end = ids.index(closing[id], start + 1)
            except ValueError:
                if strict:
                    tag = self.id_to_token(id)
                    raise ValueError(f"unclosed {tag} tag") from None
                break
            if start > position:
                runs.append((None, ids[position:start]))
            runs.append((self.id_to_token(id), ids[start : end + 1]))
            position = end + 1
        if position < len(ids):
            runs.append((None, ids[position:]))
        return runs

    # Python path.

    def _encode(self, text):
        """Ids of one string, with image spans expanded to 256 positions."""
        text = unicodedata.normalize("NFC", text)
        ids = self._encoding.encode(
            text, allowed_special="all", disallowed_special=()
        )
        try:
            runs = self._split_tags(ids, [IMAGE_TAGS])
        except ValueError as error:
            raise ValueError(f"{error} in {text!r}") from None
        output = []
        for tag, run in runs:
            if tag is None:
                if self.image_end_token_id in run:
                    raise ValueError(
                        f"{IMAGE_TAGS[1]} without a preceding {IMAGE_TAGS[0]} "
                        f"in {text!r}"
                    )
                output.extend(run)
                continue
            content = self._encoding.decode_bytes(run[1:-1])
            if len(content) > self.image_span_length:
                raise ValueError(
                    f"The image reference between {IMAGE_TAGS[0]} and "
                    f"{IMAGE_TAGS[1]} is {len(content)} bytes long (UTF-8); "
                    f"at most {self.image_span_length} fit in an image span: "
                    f"{content[:60]!r}..."
                )
            padding = self.image_span_length - len(content)
            output.append(run[0])
            output.extend(content)
            output.extend([self.image_pad_token_id] * padding)
            output.append(run[-1])
        return output

    def _decode(self, ids):
        """Text of one id sequence; image spans become `<img>X</img>`.

        A span whose inside is not byte values and `<imgpad>`, and an
        `<img>` that is never closed, are decoded token by token.
        """
        for id in ids:
            self._check_id(id)
        decode = self._encoding.decode_bytes
        pieces = []
        for tag, run in self._split_tags(ids, [IMAGE_TAGS], strict=False):
            content = [i for i in run[1:-1] if i != self.image_pad_token_id]
            if tag is not None and all(i < 256 for i in content):
                pieces.extend(
                    [decode(run[:1]), bytes(content), decode(run[-1:])]
                )
            else:
                pieces.append(decode(run))
        return b"".join(pieces).decode("utf-8", errors="replace")

    @staticmethod
    def _text_batch(inputs):
        """`(list of str, batched)` from a string, list, array or tensor."""
        if isinstance(inputs, (str, bytes)):
            inputs, batched = [inputs], False
        elif isinstance(inputs, (list, tuple)):
            inputs, batched = list(inputs), True
        elif isinstance(inputs, np.ndarray) or (
            tf is not None and isinstance(inputs, tf.Tensor)
        ):
            array = convert_to_numpy(inputs)
            if array.ndim > 1:
                raise ValueError(
                    "`tokenize()` takes a string or a 1D batch of strings; "
                    f"got an array of shape {array.shape}."
                )
            inputs, batched = array.reshape(-1).tolist(), array.ndim == 1
        else:
            raise ValueError(
                "`tokenize()` takes a string, a list of strings or a string "
                f"array/tensor; got {type(inputs).__name__}."
            )
        texts = []
        for item in inputs:
            if isinstance(item, bytes):
                item = item.decode("utf-8")
            if not isinstance(item, str):
                raise ValueError(
                    "`tokenize()` takes strings; got an element of type "
                    f"{type(item).__name__}: {item!r}."
                )
            texts.append(item)
        return texts, batched

    @staticmethod
    def _id_batch(inputs):
        """`(list of id lists, batched)` from ints, lists, arrays or tensors."""
        if tf is not None and isinstance(inputs, tf.RaggedTensor):
            inputs = inputs.to_list()
        if isinstance(inputs, (list, tuple)):
            if all(isinstance(i, (int, np.integer)) for i in inputs):
                return [[int(i) for i in inputs]], False
            return [[int(i) for i in seq] for seq in inputs], True
        if isinstance(inputs, (int, np.integer)):
            return [[int(inputs)]], False
        array = convert_to_numpy(inputs)
        if array.ndim > 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                "`detokenize()` takes integer ids of rank 0 to 2; got an "
                f"array of shape {array.shape} and dtype {array.dtype}."
            )
        if array.ndim == 2:
            return array.tolist(), True
        return [array.reshape(-1).tolist()], False

    # TensorFlow path (tf.data, tf.function): the Python code through
    # `tf.py_function`.

    def _tokenize_tf(self, inputs):
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype != tf.string or inputs.shape.rank not in (0, 1):
            raise ValueError(
                "`tokenize()` takes a string tensor of rank 0 or 1; got "
                f"dtype {inputs.dtype.name} and shape {inputs.shape}."
            )

        def tokenize_flat(texts):
            batch = [self._encode(t.decode("utf-8")) for t in texts.numpy()]
            flat = [i for ids in batch for i in ids]
            return flat, [len(ids) for ids in batch]

        flat, lengths = tf.py_function(
            tokenize_flat,
            [tf.reshape(inputs, [-1])],
            [self.compute_dtype, tf.int64],
        )
        flat.set_shape([None])
        if inputs.shape.rank == 0:
            return flat
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(flat, lengths)

    def _detokenize_tf(self, inputs):
        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.convert_to_tensor(inputs)
        rank = inputs.shape.rank
        if rank not in (1, 2):
            raise ValueError(
                "`detokenize()` takes ids of rank 1 or 2 on the TensorFlow "
                f"path; got shape {inputs.shape}."
            )
        if rank == 1:
            inputs = tf.expand_dims(inputs, 0)
        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.RaggedTensor.from_tensor(inputs)

        def detokenize_flat(flat, row_splits):
            flat, splits = flat.numpy().tolist(), row_splits.numpy()
            return [
                self._decode(flat[a:b]) for a, b in zip(splits[:-1], splits[1:])
            ]

        (outputs,) = tf.py_function(
            lambda *args: [detokenize_flat(*args)],
            [inputs.flat_values, inputs.row_splits],
            [tf.string],
        )
        outputs.set_shape([None])
        return outputs[0] if rank == 1 else outputs

    # Public API.

    def tokenize(self, inputs):
        """Token ids of a string or a batch of strings.

        Args:
            inputs: a string, a list of strings, or a string array/tensor
                of rank 0 or 1.

        Returns:
            A list of ids for one string, a list of lists for a batch; on the
            TensorFlow path a 1D tensor or a `tf.RaggedTensor`.

        Raises:
            ValueError: for an unclosed `<img>`, a `</img>` without `<img>`,
                or an image reference longer than 256 UTF-8 bytes.
        """
        self._check_vocabulary()
        if self._use_tf_workflow():
            return self._tokenize_tf(inputs)
        texts, batched = self._text_batch(inputs)
        batch = [self._encode(text) for text in texts]
        return batch if batched else batch[0]

    def detokenize(self, inputs):
        """Text of one id sequence or of a batch of them.

        Args:
            inputs: an id, a list of ids, a list of lists, or an integer
                array/tensor (rank 0-2, ragged allowed).

        Returns:
            A string for one sequence, a list of strings for a batch; on the
            TensorFlow path a string tensor.
        """
        self._check_vocabulary()
        if self._use_tf_workflow():
            return self._detokenize_tf(inputs)
        batch, batched = self._id_batch(inputs)
        texts = [self._decode(ids) for ids in batch]
        return texts if batched else texts[0]

    def to_list_format(self, text):
        """Splits a prompt into `image`/`ref`/`box`/`quad`/`text` elements.

        As the original: the text is NFC-normalized, each closed tag pair
        becomes `{kind: inner text}` and the text between them
        `{"text": ...}`. Special tokens other than the tags and
        `<|endoftext|>` are an error.

        Example:
        ```python
        tokenizer.to_list_format("<ref>dog</ref><box>(1,2),(3,4)</box> ok")
        # [{"ref": "dog"}, {"box": "(1,2),(3,4)"}, {"text": " ok"}]
        ```
        """
        self._check_vocabulary()
        text = unicodedata.normalize("NFC", text)
        try:
            ids = self._encoding.encode(
                text, allowed_special=_LIST_FORMAT_SPECIALS
            )
        except ValueError as error:
            # tiktoken's first line names the token; the rest is about its
            # own arguments.
            raise ValueError(
                f"{str(error).splitlines()[0]} `to_list_format()` accepts "
                "only the <img>, <ref>, <box> and <quad> tags, <imgpad> and "
                "<|endoftext|>."
            ) from None
        try:
            runs = self._split_tags(
                ids, [IMAGE_TAGS, REF_TAGS, BOX_TAGS, QUAD_TAGS]
            )
        except ValueError as error:
            raise ValueError(f"{error} in {text!r}") from None
        decode = self._encoding.decode_bytes
        return [
            {"text": decode(run).decode("utf-8")}
            if tag is None
            else {_LIST_FORMAT_KEYS[tag]: decode(run[1:-1]).decode("utf-8")}
            for tag, run in runs
        ]

    def from_list_format(self, elements):
        """Writes a prompt from `to_list_format`-style elements.

        As the original: `{"image": path}` becomes
        `"Picture N: <img>path</img>\\n"` with images numbered from 1,
        `{"text": t}` is copied, and `{"box": [(x1, y1, x2, y2), ...]}`
        (optionally with `"ref"`) becomes `<ref>ref</ref>` followed by one
        `<box>(x1,y1),(x2,y2)</box>` per box, coordinates as integers.
        """
        text = ""
        num_images = 0
        for element in elements:
            if "image" in element:
                num_images += 1
                text += (
                    f"Picture {num_images}: "
                    f"{IMAGE_TAGS[0]}{element['image']}{IMAGE_TAGS[1]}\n"
                )
            elif "text" in element:
                text += element["text"]
            elif "box" in element:
                if "ref" in element:
                    text += f"{REF_TAGS[0]}{element['ref']}{REF_TAGS[1]}"
                boxes = element["box"]
                if isinstance(boxes, str):
                    raise ValueError(
                        "'box' must be a list of (x1, y1, x2, y2) boxes; got "
                        f"the string {boxes!r}."
                    )
                for box in boxes:
                    if isinstance(box, str) or len(box) != 4:
                        raise ValueError(
                            "Each box must be (x1, y1, x2, y2); got "
                            f"{box!r}."
                        )
                    text += (
                        BOX_TAGS[0]
                        + "(%d,%d),(%d,%d)" % tuple(box)
                        + BOX_TAGS[1]
                    )
            else:
                raise ValueError(
                    f"Unsupported element {element!r}: expected a dict with "
                    "'image', 'text' or 'box' (and optionally 'ref')."
                )
        return text

    def get_config(self):
        config = super().get_config()
        # The ranks are saved as an asset, not in the config.
        config["vocabulary"] = None
        config["image_span_length"] = self.image_span_length
        return config
