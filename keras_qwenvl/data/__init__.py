"""Data for training Qwen-VL.

- `tasks`: the paper's pre-training task formats (caption, grounded
  caption, referring grounding, VQA, OCR with grounding, pure text) as
  preprocessor input, with pixel boxes normalized to `[0, 1000)`.
- `readers`: the original fine-tuning JSON and in-memory examples,
  validated when read; bad samples raise an error naming them or are
  skipped and counted in a `ReadReport`.
- `synthetic`: built-in synthetic shapes, rendered words and chats, and
  `vocabulary_words` for a byte-level vocabulary with their words merged.
- `packing`: same-task samples packed into fixed-length rows with segment
  ids, so that no attention crosses a sample boundary.
- `loader`: `QwenVLDataLoader`, Grain batches of static shape for `fit()`,
  and `RawExamplesMixin`, which lets `fit()` take raw examples.
- `tfds_sources`: TensorFlow Datasets (`coco_captions`, `ref_coco`, or any
  dataset with images, texts and boxes through a `TfdsMapping`) as
  task-format samples.
- `cleaning`: the paper's filters for image-text pairs as counted steps,
  and the greedy clean-up of nested grounding phrases.
- `pdf`: PDF pages rendered into OCR-with-grounding samples.
"""

from keras_qwenvl.data import cleaning
from keras_qwenvl.data import pdf
from keras_qwenvl.data import tasks
from keras_qwenvl.data import tfds_sources
from keras_qwenvl.data.cleaning import CleaningPipeline
from keras_qwenvl.data.cleaning import CleaningReport
from keras_qwenvl.data.cleaning import paper_filters
from keras_qwenvl.data.cleaning import remove_nested_groundings
from keras_qwenvl.data.loader import QwenVLDataLoader
from keras_qwenvl.data.loader import RawExamplesMixin
from keras_qwenvl.data.loader import fit_loader
from keras_qwenvl.data.loader import split_batch
from keras_qwenvl.data.packing import PackingStats
from keras_qwenvl.data.pdf import PdfOcrSource
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
from keras_qwenvl.data.synthetic import vocabulary_words
from keras_qwenvl.data.tfds_sources import TfdsMapping
from keras_qwenvl.data.tfds_sources import coco_caption_examples
from keras_qwenvl.data.tfds_sources import ref_coco_examples
from keras_qwenvl.data.tfds_sources import tfds_examples

__all__ = [
    "BadSampleError",
    "CleaningPipeline",
    "CleaningReport",
    "PackingStats",
    "PdfOcrSource",
    "QwenVLDataLoader",
    "RawExamplesMixin",
    "ReadReport",
    "RowPacker",
    "SyntheticConfig",
    "SyntheticSource",
    "TfdsMapping",
    "cleaning",
    "coco_caption_examples",
    "fit_loader",
    "pack_samples",
    "paper_filters",
    "pdf",
    "read_examples",
    "read_finetune_json",
    "ref_coco_examples",
    "remove_nested_groundings",
    "split_batch",
    "synthetic_examples",
    "synthetic_mixture",
    "vocabulary_words",
    "tasks",
    "tfds_examples",
    "tfds_sources",
]
