"""The evaluation tasks: records, prompts, references and metrics.

Records are dicts in the JSON-lines form of the original repository's
`eval_mm/` data files, one sample per line:

| task | fields | metric |
| --- | --- | --- |
| grounding | `image`, `sent`, `bbox`, `width`, `height` | grounding accuracy |
| vqa | `image`, `question`, `question_id`, `answers` | VQA accuracy |
| docvqa | `image`, `question`, `question_id`, `answer` | ANLS |
| chartqa | `image`, `question`, `answer` | relaxed accuracy |
| caption | `image`, `captions` | CIDEr-D |
| multiple_choice | `image`, `question`, `choices`, `answer`, `hint` | accuracy |

Assumptions where the original files leave room:
- `bbox` is the ground-truth box in pixels, `[x1, y1, x2, y2]` (the form
  the original grounding evaluation compares with directly); COCO's
  `[x, y, w, h]` is read with `bbox_format="xywh"`. `width` and `height`
  may be left out, then they are read from the image file.
- Answers (`answers` or `answer`) are a string or a list of strings; VQA v2
  style `[{"answer": ...}, ...]` lists work too, and numbers are read as
  their text. VQA accuracy needs the (usually 10) human answers of each
  question: the original files keep them in a separate annotation file,
  which `load_annotations` reads and `read_records` merges by
  `question_id`.
- Captions are a list `captions` (or `caption`); the COCO-style caption
  file of the original (`{"images": [{"id", "image"}], "annotations":
  [{"image_id", "caption"}]}`) is read as well.
- Multiple choice: `answer` is the index of the right choice, `hint` may be
  empty or missing (then "N/A", as the original).
- `image` is a path, relative to `image_root` (default: the current
  directory, as the original).

Prompts are the original evaluation's base-model prompts (no ChatML), with
the image passed alongside its `<img></img>` tag (the bytes inside an image
span never change the model's output).
"""

import dataclasses
import json
import os
import string

from keras_qwenvl.data import tasks as training_tasks
from keras_qwenvl.evaluation import cider
from keras_qwenvl.evaluation import grounding
from keras_qwenvl.evaluation import vqa

CAPTION_PROMPT = "Describe the image in English:"
MULTIPLE_CHOICE_PROMPT = (
    "Context: {hint}\nQuestion: {question}\nOptions: {options}\nAnswer:"
)
# Choice i is written "{letter}. {choice}" and scored as " {letter}".
CHOICE_LETTERS = string.ascii_uppercase
BBOX_FORMATS = ("xyxy", "xywh")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One record made ready for the model.

    Attributes:
        prompt: the prompt text, its `<img></img>` tag empty.
        image: the path of the image that fills the tag.
        reference: what the metric compares the answer with.
        options: the option strings to score (multiple choice), or None.
    """

    prompt: str
    image: str
    reference: object
    options: tuple = None


_KINDS = {str: "a string", int: "an integer", list: "a list", float: "a number"}


def _field(record, key, where, kind=str):
    """`record[key]`, which must exist and be of `kind` (float: a number)."""
    if key not in record:
        raise ValueError(f"{where}: the record has no {key!r} field.")
    value = record[key]
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or isinstance(value, bool):
        raise ValueError(
            f"{where}: {key!r} must be {_KINDS[kind]}. Received: {value!r}"
        )
    return value


def _answer_text(value, where):
    if isinstance(value, dict) and "answer" in value:
        value = value["answer"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: an answer must be a string (or a number, or "
            f'{{"answer": ...}}). Received: {value!r}'
        )
    return value


def read_answers(record, where, keys=("answers", "answer")):
    """The ground-truth answers of a record as a list of strings.

    Reads the first of `keys` present: a string, a number, or a list of
    them (or of `{"answer": ...}` dicts).
    """
    for key in keys:
        if key in record:
            value = record[key]
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ValueError(f"{where}: {key!r} is an empty list.")
            return [_answer_text(v, where) for v in values]
    raise ValueError(
        f"{where}: the record has no ground truth; expected one of "
        f"{list(keys)}."
    )


def _image_path(record, where, image_root):
    image = _field(record, "image", where)
    return os.path.join(image_root, image) if image_root else image


def _grounding_sample(record, where, path, bbox_format):
    phrase = _field(record, "sent", where)
    box = record.get("bbox")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box
        )
    ):
        raise ValueError(
            f"{where}: 'bbox' must be four numbers in pixels. Received: {box!r}"
        )
    box = [float(v) for v in box]
    if bbox_format == "xywh":
        box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
    if "width" in record or "height" in record:
        size = (
            _field(record, "width", where, float),
            _field(record, "height", where, float),
        )
    else:
        size = training_tasks.image_size(path)
    prompt = training_tasks.grounding_prompt(phrase) + "<box>"
    return Sample(prompt, path, {"bbox": box, "image_size": list(size)})


def _question_sample(record, where, path):
    question = _field(record, "question", where)
    return Sample(
        training_tasks.vqa_prompt(question),
        path,
        read_answers(record, where),
    )


def _caption_sample(record, where, path):
    return Sample(
        training_tasks.IMAGE_PLACEHOLDER + CAPTION_PROMPT,
        path,
        read_answers(record, where, keys=("captions", "caption")),
    )


def _multiple_choice_sample(record, where, path):
    question = _field(record, "question", where)
    choices = _field(record, "choices", where, list)
    if not 2 <= len(choices) <= len(CHOICE_LETTERS) or not all(
        isinstance(c, str) for c in choices
    ):
        raise ValueError(
            f"{where}: 'choices' must be 2 to {len(CHOICE_LETTERS)} strings. "
            f"Received: {choices!r}"
        )
    answer = _field(record, "answer", where, int)
    if not 0 <= answer < len(choices):
        raise ValueError(
            f"{where}: 'answer' is the index of the right choice, in "
            f"[0, {len(choices)}). Received: {answer}"
        )
    letters = CHOICE_LETTERS[: len(choices)]
    prompt = MULTIPLE_CHOICE_PROMPT.format(
        hint=record.get("hint") or "N/A",
        question=question,
        options="\n".join(f"{l}. {c}" for l, c in zip(letters, choices)),
    )
    return Sample(
        training_tasks.IMAGE_PLACEHOLDER + prompt,
        path,
        letters[answer],
        options=tuple(f" {letter}" for letter in letters),
    )


def _per_sample(function):
    """A corpus metric from a metric of one answer and its reference."""

    def metric(predictions, references):
        return [function(p, r) for p, r in zip(predictions, references)]

    return metric


def _grounding_metric(answer, reference):
    return grounding.grounding_accuracy(
        answer, reference["bbox"], reference["image_size"]
    )


# Metric name -> `f(predictions, references) -> per-sample scores`.
METRICS = {
    "grounding_accuracy": _per_sample(_grounding_metric),
    "vqa_accuracy": _per_sample(vqa.vqa_accuracy),
    "anls": _per_sample(vqa.anls),
    "relaxed_accuracy": _per_sample(vqa.relaxed_accuracy),
    "exact_match": _per_sample(vqa.exact_match),
    "cider_d": lambda p, r: cider.cider_d(p, r)[1].tolist(),
    "accuracy": _per_sample(lambda p, r: float(p == r)),
}
# Metrics that read answers (strings) and may replace each other.
ANSWER_METRICS = ("vqa_accuracy", "anls", "relaxed_accuracy", "exact_match")


@dataclasses.dataclass(frozen=True)
class EvaluationTask:
    """How one kind of benchmark is prompted and scored.

    Attributes:
        name: the task's name.
        metric: the default metric, a key of `METRICS`.
        max_new_tokens: the original's generation budget (None: options
            are scored, nothing is generated).
        min_new_tokens: the original's minimum number of new tokens.
    """

    name: str
    metric: str
    max_new_tokens: int
    min_new_tokens: int


TASKS = {
    task.name: task
    for task in (
        EvaluationTask("grounding", "grounding_accuracy", 28, 10),
        EvaluationTask("vqa", "vqa_accuracy", 10, 1),
        EvaluationTask("docvqa", "anls", 100, 1),
        EvaluationTask("chartqa", "relaxed_accuracy", 100, 1),
        EvaluationTask("caption", "cider_d", 30, 8),
        EvaluationTask("multiple_choice", "accuracy", None, 0),
    )
}


def make_sample(task, record, where, image_root=None, bbox_format="xyxy"):
    """Validates one record of `task` and makes its `Sample`.

    Raises:
        ValueError: naming the record (`where`) for a missing or malformed
            field.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object.")
    path = _image_path(record, where, image_root)
    if task.name == "grounding":
        return _grounding_sample(record, where, path, bbox_format)
    if task.name == "caption":
        return _caption_sample(record, where, path)
    if task.name == "multiple_choice":
        return _multiple_choice_sample(record, where, path)
    return _question_sample(record, where, path)


def get_task(name):
    """The `EvaluationTask` called `name`; raises for an unknown name."""
    if name not in TASKS:
        raise ValueError(
            f"Unknown evaluation task {name!r}; expected one of "
            f"{sorted(TASKS)}."
        )
    return TASKS[name]


def check_metric(task, metric):
    """The metric to use for `task`: its default, or an answer metric in
    place of another answer metric (e.g. exact match for OCR-VQA)."""
    if metric is None or metric == task.metric:
        return task.metric
    if metric in ANSWER_METRICS and task.metric in ANSWER_METRICS:
        return metric
    allowed = ANSWER_METRICS if task.metric in ANSWER_METRICS else ()
    raise ValueError(
        f"Task {task.name!r} is scored with {task.metric!r}"
        + (f" or one of {list(allowed)}" if allowed else "")
        + f"; received metric={metric!r}."
    )


def make_samples(
    records, task, metric=None, image_root=None, bbox_format="xyxy"
):
    """Validates records and turns them into `Sample`s.

    Args:
        records: a list of `(where, record)`, `where` naming the record in
            error messages (e.g. "line 3 of val.jsonl").
        task: an `EvaluationTask`.
        metric: the metric that will score the answers (default: the
            task's).
        image_root: folder of relative image paths, or None.
        bbox_format: "xyxy" or "xywh" (grounding).

    Raises:
        ValueError: naming the record, for a missing or malformed field.
    """
    metric = check_metric(task, metric)
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(
            f"`bbox_format` must be one of {BBOX_FORMATS}. Received: "
            f"{bbox_format!r}"
        )
    samples = []
    for where, record in records:
        sample = make_sample(task, record, where, image_root, bbox_format)
        if metric == "vqa_accuracy" and len(sample.reference) < 2:
            raise ValueError(
                f"{where}: VQA accuracy compares the answer with the human "
                "answers of the question (10 in VQA v2), but the record has "
                f"{len(sample.reference)}; give them as 'answers' or merge "
                "the official annotation file (`annotations=`)."
            )
        samples.append(sample)
    if not samples:
        raise ValueError("There are no records to evaluate.")
    return samples


def load_annotations(path):
    """Ground-truth answers by question id from an official annotation file.

    Reads the VQA v2 annotation JSON (`{"annotations": [{"question_id",
    "answers": [{"answer": ...}, ...]}, ...]}`, also used by OK-VQA,
    TextVQA and VizWiz) and the DocVQA ground-truth JSON (`{"data":
    [{"questionId", "answers": [...]}, ...]}`).

    Returns:
        A dict from the question id, as a string, to its list of answers.
    """
    with open(path, encoding="utf-8") as file:
        content = json.load(file)
    if isinstance(content, dict) and "annotations" in content:
        entries, id_key = content["annotations"], "question_id"
    elif isinstance(content, dict) and "data" in content:
        entries, id_key = content["data"], "questionId"
    else:
        raise ValueError(
            f"{path}: not a VQA annotation file (no 'annotations') nor a "
            "DocVQA ground-truth file (no 'data')."
        )
    answers = {}
    for index, entry in enumerate(entries):
        where = f"entry {index} of {path}"
        if id_key not in entry:
            raise ValueError(f"{where}: no {id_key!r} field.")
        answers[str(entry[id_key])] = read_answers(entry, where, ("answers",))
    return answers


def _caption_file_records(content, path):
    """Records of a COCO-style caption file, one per image."""
    captions = {}
    for annotation in content["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(
            annotation["caption"]
        )
    return [
        (
            f"image {entry['id']} of {path}",
            {
                "image": entry["image"],
                "image_id": entry["id"],
                "captions": captions.get(entry["id"], []),
            },
        )
        for entry in content["images"]
    ]


def read_records(path, annotations=None, limit=None):
    """Reads an evaluation file: JSON lines, or a COCO-style caption file.

    Args:
        path: the data file.
        annotations: optional path of an official annotation file (see
            `load_annotations`); its answers become each record's
            `answers`, matched by `question_id`.
        limit: read only the first `limit` records.

    Returns:
        A list of `(where, record)`, `where` naming the line.
    """
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = None
    if isinstance(content, dict) and {"images", "annotations"} <= set(content):
        records = _caption_file_records(content, path)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"line {number} of {path}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: not valid JSON ({error})."
                ) from None
    if limit is not None:
        records = records[:limit]
    if annotations is not None:
        answers = load_annotations(annotations)
        for where, record in records:
            key = str(record.get("question_id"))
            if key not in answers:
                raise ValueError(
                    f"{where}: question_id {record.get('question_id')!r} is "
                    f"not in the annotation file {annotations}."
                )
            record["answers"] = answers[key]
    return records
