"""Evaluation of Qwen-VL with the original repository's protocol.

- `vqa`: VQA accuracy with the official answer normalization, ANLS,
  ChartQA's relaxed accuracy, exact match.
- `grounding`: referring grounding accuracy (first box of the answer,
  divided by 999, IoU >= 0.5).
- `cider`: CIDEr-D as coco-caption computes it.
- `generation`: batched greedy answers with per-sequence token bounds
  (`BoundedGreedySampler`) and option log-likelihoods for multiple choice.
- `tasks`: record formats, prompts and metrics of each task.
- `runner`: `evaluate()` and the command line
  (`python -m keras_qwenvl.evaluation --help`).
"""

from keras_qwenvl.evaluation.cider import cider_d
from keras_qwenvl.evaluation.cider import ptb_tokenize
from keras_qwenvl.evaluation.generation import BoundedGreedySampler
from keras_qwenvl.evaluation.generation import generate_answers
from keras_qwenvl.evaluation.generation import score_options
from keras_qwenvl.evaluation.grounding import box_iou
from keras_qwenvl.evaluation.grounding import grounding_accuracy
from keras_qwenvl.evaluation.grounding import parse_first_box
from keras_qwenvl.evaluation.grounding import predicted_box
from keras_qwenvl.evaluation.runner import evaluate
from keras_qwenvl.evaluation.runner import main
from keras_qwenvl.evaluation.tasks import TASKS
from keras_qwenvl.evaluation.tasks import load_annotations
from keras_qwenvl.evaluation.tasks import read_records
from keras_qwenvl.evaluation.vqa import anls
from keras_qwenvl.evaluation.vqa import exact_match
from keras_qwenvl.evaluation.vqa import normalize_vqa_answer
from keras_qwenvl.evaluation.vqa import relaxed_accuracy
from keras_qwenvl.evaluation.vqa import relaxed_correctness
from keras_qwenvl.evaluation.vqa import vqa_accuracy

__all__ = [
    "BoundedGreedySampler",
    "TASKS",
    "anls",
    "box_iou",
    "cider_d",
    "evaluate",
    "exact_match",
    "generate_answers",
    "grounding_accuracy",
    "load_annotations",
    "main",
    "normalize_vqa_answer",
    "parse_first_box",
    "predicted_box",
    "ptb_tokenize",
    "read_records",
    "relaxed_accuracy",
    "relaxed_correctness",
    "score_options",
    "vqa_accuracy",
]
