"""Running an evaluation: records in, per-sample results and a score out.

From Python, `evaluate(causal_lm, records, "vqa")` on an already loaded
model; from the command line,

    python -m keras_qwenvl.evaluation --preset DIR --data FILE.jsonl \\
        --task grounding|vqa|docvqa|chartqa|caption|multiple_choice \\
        --out DIR [--batch-size N] [--max-new-tokens N]

which writes `DIR/predictions.jsonl` (one line per sample: its ids, prompt,
prediction, reference and score) and `DIR/score.json`. Scores are
fractions in [0, 1] (CIDEr-D unscaled); published tables show them times
100. See `keras_qwenvl.evaluation.tasks` for the record formats.
"""

import argparse
import json
import os
import sys

import numpy as np

from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.evaluation import generation
from keras_qwenvl.evaluation import tasks as evaluation_tasks

PREDICTIONS_FILE = "predictions.jsonl"
SCORE_FILE = "score.json"
# Record fields copied to the per-sample results to identify the sample.
_ID_FIELDS = ("question_id", "questionId", "image_id", "id", "image")


def evaluate(
    causal_lm,
    records,
    task,
    batch_size=8,
    max_new_tokens=None,
    min_new_tokens=None,
    metric=None,
    image_root=None,
    bbox_format="xyxy",
):
    """Evaluates a model on records of one task, as the original code does.

    Generation is greedy and batched (`generation.generate_answers`);
    multiple-choice options are ranked by mean log-likelihood
    (`generation.score_options`).

    Args:
        causal_lm: a `QwenVLCausalLM` with a preprocessor.
        records: a list of record dicts (see `keras_qwenvl.evaluation.tasks`)
            or of `(where, record)` pairs as `tasks.read_records` returns.
        task: a task name, e.g. "grounding".
        batch_size: prompts per generation call or forward pass.
        max_new_tokens: new-token budget; defaults to the task's (28 for
            grounding, 10 for VQA, 100 for DocVQA and ChartQA, 30 for
            captions).
        min_new_tokens: fewest new tokens; defaults to the task's (10, 1,
            1, 1, 8).
        metric: replaces the task's answer metric (e.g. "exact_match" for
            OCR-VQA); defaults to the task's.
        image_root: folder of relative image paths, or None.
        bbox_format: "xyxy" or "xywh" for grounding boxes.

    Returns:
        `(results, summary)`: a list with one dict per sample (`index`, the
        record's ids, `prompt`, `prediction`, `reference`, `score`, and for
        multiple choice `option_log_likelihoods`) and a dict with `task`,
        `metric`, `score` (the mean of the sample scores) and the settings.
    """
    task = evaluation_tasks.get_task(task)
    metric = evaluation_tasks.check_metric(task, metric)
    records = [
        item if isinstance(item, tuple) else (f"record {index}", item)
        for index, item in enumerate(records)
    ]
    samples = evaluation_tasks.make_samples(
        records, task, metric, image_root=image_root, bbox_format=bbox_format
    )
    prompts = [sample.prompt for sample in samples]
    images = [[sample.image] for sample in samples]
    extras = [{} for _ in samples]
    if task.max_new_tokens is None:
        likelihoods = generation.score_options(
            causal_lm,
            prompts,
            [sample.options for sample in samples],
            images=images,
            batch_size=batch_size,
        )
        predictions = []
        for scores, extra in zip(likelihoods, extras):
            letter = evaluation_tasks.CHOICE_LETTERS[int(np.argmax(scores))]
            predictions.append(letter)
            extra["option_log_likelihoods"] = scores.tolist()
        settings = {}
    else:
        if max_new_tokens is None:
            max_new_tokens = task.max_new_tokens
        if min_new_tokens is None:
            min_new_tokens = min(task.min_new_tokens, max_new_tokens)
        predictions = generation.generate_answers(
            causal_lm,
            prompts,
            images=images,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
        )
        settings = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
        }
    references = [sample.reference for sample in samples]
    scores = evaluation_tasks.METRICS[metric](predictions, references)
    results = []
    for index, ((_, record), sample, prediction, score, extra) in enumerate(
        zip(records, samples, predictions, scores, extras)
    ):
        result = {"index": index}
        result.update({k: record[k] for k in _ID_FIELDS if k in record})
        result.update(
            {
                "prompt": sample.prompt,
                "prediction": prediction,
                "reference": sample.reference,
                "score": float(score),
            }
        )
        result.update(extra)
        results.append(result)
    summary = {
        "task": task.name,
        "metric": metric,
        "score": float(np.mean(scores)),
        "num_samples": len(results),
        "batch_size": batch_size,
        **settings,
    }
    return results, summary


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_qwenvl.evaluation",
        description=(
            "Evaluate a Qwen-VL preset on a benchmark file with the original "
            "repository's prompts and metrics."
        ),
    )
    parser.add_argument(
        "--preset",
        required=True,
        help="Keras preset or Hugging Face Qwen-VL folder (or preset name).",
    )
    parser.add_argument(
        "--data", required=True, help="evaluation file (JSON lines)."
    )
    parser.add_argument(
        "--task", required=True, choices=sorted(evaluation_tasks.TASKS)
    )
    parser.add_argument("--out", required=True, help="output folder.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-new-tokens", type=int, help="default: the task's budget."
    )
    parser.add_argument(
        "--min-new-tokens", type=int, help="default: the task's minimum."
    )
    parser.add_argument(
        "--metric",
        choices=evaluation_tasks.ANSWER_METRICS,
        help="answer metric replacing the task's (e.g. exact_match).",
    )
    parser.add_argument(
        "--image-root", help="folder of relative image paths (default: .)."
    )
    parser.add_argument(
        "--annotations",
        help="official VQA or DocVQA annotation JSON with the answers.",
    )
    parser.add_argument(
        "--bbox-format",
        choices=evaluation_tasks.BBOX_FORMATS,
        default="xyxy",
        help="grounding boxes as x1,y1,x2,y2 (default) or COCO x,y,w,h.",
    )
    parser.add_argument(
        "--limit", type=int, help="evaluate only the first N records."
    )
    parser.add_argument(
        "--dtype", help="compute dtype of the model, e.g. bfloat16."
    )
    return parser


def main(argv=None):
    """Command-line entry point; see the module docstring.

    Args:
        argv: the arguments without the program name (default:
            `sys.argv[1:]`).

    Returns:
        0, the exit status, after writing the results under `--out`.
    """
    args = _parser().parse_args(argv)
    records = evaluation_tasks.read_records(
        args.data, annotations=args.annotations, limit=args.limit
    )
    # Check the records before the (slow) model load.
    task = evaluation_tasks.get_task(args.task)
    evaluation_tasks.make_samples(
        records,
        task,
        args.metric,
        image_root=args.image_root,
        bbox_format=args.bbox_format,
    )
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    causal_lm = QwenVLCausalLM.from_preset(args.preset, **kwargs)
    results, summary = evaluate(
        causal_lm,
        records,
        args.task,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        metric=args.metric,
        image_root=args.image_root,
        bbox_format=args.bbox_format,
    )
    summary.update({"preset": args.preset, "data": args.data})
    os.makedirs(args.out, exist_ok=True)
    with open(
        os.path.join(args.out, PREDICTIONS_FILE), "w", encoding="utf-8"
    ) as file:
        file.writelines(
            json.dumps(result, ensure_ascii=False) + "\n" for result in results
        )
    with open(
        os.path.join(args.out, SCORE_FILE), "w", encoding="utf-8"
    ) as file:
        json.dump(summary, file, indent=2)
    print(json.dumps(summary), file=sys.stdout)
    return 0
