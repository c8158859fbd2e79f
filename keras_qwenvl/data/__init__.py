"""Data for training Qwen-VL.

- `tasks`: the paper's pre-training task formats (caption, grounded
  caption, referring grounding, VQA, OCR with grounding, pure text) as
  preprocessor input, with pixel boxes normalized to `[0, 1000)`.
- `readers`: the original fine-tuning JSON and in-memory examples,
  validated when read; bad samples raise an error naming them or are
  skipped and counted in a `ReadReport`.
- `synthetic`: built-in synthetic shapes, rendered words and chats.
- `packing`: same-task samples packed into fixed-length rows with segment
  ids, so that no attention crosses a sample boundary.
- `loader`: `QwenVLDataLoader`, Grain batches of static shape for `fit()`,
  and `RawExamplesMixin`, which lets `fit()` take raw examples.
"""

from keras_qwenvl.data import tasks
from keras_qwenvl.data.loader import QwenVLDataLoader
from keras_qwenvl.data.loader import RawExamplesMixin
from keras_qwenvl.data.loader import fit_loader
from keras_qwenvl.data.loader import split_batch
from keras_qwenvl.data.packing import PackingStats
from keras_qwenvl.data.packing import RowPacker
from keras_qwenvl.data.packing import pack_samples
from keras_qwenvl.data.readers import BadSampleError
from keras_qwenvl.data.readers import ReadReport
from keras_qwenvl.data.readers import read_examples
from keras_qwenvl.data.readers import read_finetune_json
from keras_qwenvl.data.synthetic import SyntheticConfig
from keras_qwenvl.data.synthetic import SyntheticSource
from keras_qwenvl.data.synthetic import synthetic_examples
from keras_qwenvl.data.synthetic import synthetic_mixture

__all__ = [
    "BadSampleError",
    "PackingStats",
    "QwenVLDataLoader",
    "RawExamplesMixin",
    "ReadReport",
    "RowPacker",
    "SyntheticConfig",
    "SyntheticSource",
    "fit_loader",
    "pack_samples",
    "read_examples",
    "read_finetune_json",
    "split_batch",
    "synthetic_examples",
    "synthetic_mixture",
    "tasks",
]
