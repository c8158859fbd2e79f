"""Batched greedy generation and option scoring for evaluation.

The original evaluation prompts the base model without ChatML, decodes
greedily with `min_new_tokens` / `max_new_tokens` per sequence, stops on
`<|endoftext|>` only, and decodes the new tokens without special tokens.
`generate_answers` does the same through `QwenVLCausalLM.generate` (which
pads batches of prompts of different lengths), with `BoundedGreedySampler`
enforcing both token bounds per sequence. `score_options` gives the mean
log-likelihood of each answer option after a prompt, as the original
multiple-choice evaluation ranks options by their mean token
cross-entropy.
"""

import contextlib
import re

import keras
import numpy as np
from keras import ops
from keras_hub.samplers import GreedySampler

from keras_qwenvl.tokenizer import SPECIAL_TOKENS

_SPECIAL_TOKEN_TEXT = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class BoundedGreedySampler(GreedySampler):
    """Greedy decoding with a minimum and a maximum number of new tokens.

    Counted per sequence of the batch from its own prompt length (the
    number of `True` entries of its mask): for the first `min_new_tokens`
    new tokens the stop tokens are excluded (Hugging Face's
    `min_new_tokens`), and once a sequence has `max_new_tokens` new tokens
    it is made to emit a stop token, which ends it (`max_new_tokens`).
    Generation then stops as soon as every sequence is done, whatever the
    padded length. Needs `stop_token_ids`.

    Args:
        max_new_tokens: the most tokens a sequence may generate (>= 1).
        min_new_tokens: the fewest tokens a sequence generates before it
            may stop (0 to `max_new_tokens`).

    Example:
    ```python
    causal_lm.compile(sampler=BoundedGreedySampler(max_new_tokens=10))
    causal_lm.generate(prompts, max_length=longest_prompt + 10)
    ```
    """

    def __init__(self, max_new_tokens, min_new_tokens=0, **kwargs):
        super().__init__(**kwargs)
        if not (
            isinstance(max_new_tokens, int)
            and isinstance(min_new_tokens, int)
            and 0 <= min_new_tokens <= max_new_tokens
            and max_new_tokens >= 1
        ):
            raise ValueError(
                "`max_new_tokens` must be an int >= 1 and `min_new_tokens` "
                "an int in [0, max_new_tokens]. Received: "
                f"max_new_tokens={max_new_tokens!r}, "
                f"min_new_tokens={min_new_tokens!r}"
            )
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens

    def __call__(
        self,
        next,
        prompt,
        cache=None,
        index=0,
        mask=None,
        stop_token_ids=None,
        **kwargs,
    ):
        if not stop_token_ids:
            raise ValueError(
                "`BoundedGreedySampler` ends sequences with a stop token; "
                "pass `stop_token_ids` to `generate()`."
            )
        if mask is None:
            mask = ops.zeros_like(prompt, dtype="bool")
        prompt_lengths = ops.sum(ops.cast(mask, "int32"), axis=1)
        stop_ids = ops.convert_to_tensor(list(stop_token_ids), dtype="int32")

        def bounded_next(prompt, cache, index):
            logits, hidden_states, cache = next(prompt, cache, index)
            logits = ops.cast(logits, "float32")
            vocabulary = ops.arange(ops.shape(logits)[-1], dtype="int32")
            is_stop = ops.any(
                ops.equal(vocabulary[:, None], stop_ids[None, :]), axis=-1
            )[None, :]
            # New tokens each sequence has before the one predicted here.
            generated = (index - prompt_lengths)[:, None]
            blocked = ops.logical_or(
                ops.logical_and(
                    ops.less(generated, self.min_new_tokens), is_stop
                ),
                ops.logical_and(
                    ops.greater_equal(generated, self.max_new_tokens),
                    ops.logical_not(is_stop),
                ),
            )
            logits = ops.where(blocked, float("-inf"), logits)
            return logits, hidden_states, cache

        return super().__call__(
            bounded_next,
            prompt,
            cache=cache,
            index=index,
            mask=mask,
            stop_token_ids=stop_token_ids,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.min_new_tokens,
            }
        )
        return config


@contextlib.contextmanager
def _using_sampler(causal_lm, sampler):
    """Generates with `sampler`, then restores the model's own sampler.

    Sets the sampler as `compile(sampler=...)` does, without touching the
    optimizer, loss or metrics the model may be compiled with.
    """
    previous = (causal_lm.sampler, causal_lm.generate_function)
    causal_lm.sampler, causal_lm.generate_function = sampler, None
    try:
        yield
    finally:
        causal_lm.sampler, causal_lm.generate_function = previous


def _preprocessor(causal_lm):
    if causal_lm.preprocessor is None:
        raise ValueError(
            "Evaluation needs a `QwenVLCausalLM` with a preprocessor (as "
            "`QwenVLCausalLM.from_preset()` builds it)."
        )
    return causal_lm.preprocessor


def _check_batch(prompts, images, batch_size):
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of strings.")
    if images is not None:
        images = list(images)
        if len(images) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(images)} image lists; pass "
                "one list of images per prompt (or `images=None`)."
            )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(
            f"`batch_size` must be a positive int. Received: {batch_size!r}"
        )
    return prompts, images


def _batches(prompts, images, batch_size, fill=False):
    """`{"prompts": ..., "images": ...}` slices of `batch_size` prompts.

    With `fill`, a last, smaller batch is topped up with copies of its last
    prompt, so that every batch has the same shape (a compiled function is
    then traced once); the caller drops the extra outputs.
    """
    size = min(batch_size, len(prompts)) if fill else 0
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        extra = max(size - len(prompts[start:end]), 0)
        batch = {"prompts": prompts[start:end] + prompts[-1:] * extra}
        if images is not None:
            batch["images"] = images[start:end] + images[-1:] * extra
        yield batch


def strip_special_tokens(text):
    """Removes every special token (`<|endoftext|>`, `<ref>`, `<box>`, ...)
    from a decoded text, as the original evaluation's
    `decode(..., skip_special_tokens=True)` drops their ids."""
    return _SPECIAL_TOKEN_TEXT.sub("", text)


def generate_answers(
    causal_lm,
    prompts,
    images=None,
    batch_size=8,
    max_new_tokens=10,
    min_new_tokens=0,
):
    """Greedy answers to evaluation prompts, in batches.

    Each prompt gets at most `max_new_tokens` and at least `min_new_tokens`
    new tokens (per prompt, whatever the other prompts of its batch);
    decoding stops at `<|endoftext|>`. The answer is the new text without
    special tokens, stripped, as the original evaluation decodes it. The
    model's sampler is restored afterwards.

    Args:
        causal_lm: a `QwenVLCausalLM` with a preprocessor.
        prompts: the prompt strings, e.g. `"<img>a.jpg</img>Q? Answer:"`.
        images: per prompt, the list of images filling its `<img>` tags
            (paths, arrays or PIL images), or `None` to load each tag's
            text as a path.
        batch_size: prompts per `generate()` call.
        max_new_tokens: the most new tokens per prompt.
        min_new_tokens: the fewest new tokens per prompt.

    Returns:
        A list of strings, one per prompt.
    """
    prompts, images = _check_batch(prompts, images, batch_size)
    tokenizer = _preprocessor(causal_lm).tokenizer
    sampler = BoundedGreedySampler(max_new_tokens, min_new_tokens)
    # One padded length and batch size for every batch keep the compiled
    # function's shapes fixed; the sampler stops each batch early.
    longest = max(len(ids) for ids in tokenizer.tokenize(prompts))
    answers = []
    with _using_sampler(causal_lm, sampler):
        for batch in _batches(prompts, images, batch_size, fill=True):
            outputs = causal_lm.generate(
                batch,
                max_length=longest + max_new_tokens,
                stop_token_ids=(tokenizer.end_token_id,),
                strip_prompt=True,
            )
            answers += [strip_special_tokens(text).strip() for text in outputs]
    return answers[: len(prompts)]


def score_options(causal_lm, prompts, options, images=None, batch_size=8):
    """Mean log-likelihood of each option's tokens after its prompt.

    The prompt and the option are tokenized apart and concatenated, as the
    original multiple-choice evaluation does; every option of every prompt
    of a batch is one row of a single forward pass, and only the positions
    that predict option tokens are projected to the vocabulary. The
    highest mean log-likelihood is the lowest mean cross-entropy, the
    original's pick.

    Args:
        causal_lm: a `QwenVLCausalLM` with a preprocessor.
        prompts: the prompt strings.
        options: per prompt, a list of option strings (e.g. `[" A", " B"]`).
        images: per prompt, the list of images filling its `<img>` tags, or
            `None` to load each tag's text as a path.
        batch_size: prompts per forward pass.

    Returns:
        A list with, per prompt, a float64 array of the options' mean
        log-likelihoods.
    """
    prompts, images = _check_batch(prompts, images, batch_size)
    options = [list(choices) for choices in options]
    if len(options) != len(prompts) or not all(options):
        raise ValueError(
            "`options` must hold one non-empty list of option strings per "
            f"prompt ({len(prompts)} prompts, {len(options)} option lists)."
        )
    preprocessor = _preprocessor(causal_lm)
    tokenizer = preprocessor.tokenizer
    scores = []
    for start, batch in zip(
        range(0, len(prompts), batch_size),
        _batches(prompts, images, batch_size),
    ):
        batch_options = options[start : start + batch_size]
        prompt_ids = tokenizer.tokenize(batch["prompts"])
        inputs = preprocessor.generate_preprocess(
            batch, sequence_length=max(len(ids) for ids in prompt_ids)
        )
        rows, targets, sample_of_row = [], [], []
        for sample, (ids, choices) in enumerate(zip(prompt_ids, batch_options)):
            for target in tokenizer.tokenize(choices):
                if not target:
                    raise ValueError(
                        f"prompt {start + sample}: an option is empty; "
                        f"options: {choices!r}"
                    )
                rows.append(list(ids) + list(target))
                targets.append(list(target))
                sample_of_row.append(sample)
        row_scores = _mean_log_likelihoods(
            causal_lm, inputs, rows, targets, sample_of_row
        )
        position = 0
        for choices in batch_options:
            scores.append(row_scores[position : position + len(choices)])
            position += len(choices)
    return scores


def _mean_log_likelihoods(causal_lm, inputs, rows, targets, sample_of_row):
    """One forward pass over `rows`; the mean log-probability of each row's
    last `len(target)` tokens."""
    tokenizer = causal_lm.preprocessor.tokenizer
    length = max(len(row) for row in rows)
    most_targets = max(len(target) for target in targets)
    token_ids = np.full((len(rows), length), tokenizer.pad_token_id, "int32")
    padding_mask = np.zeros((len(rows), length), dtype="bool")
    # Row r's target token j sits at `start + j`, predicted from the
    # position before it.
    positions = np.zeros((len(rows), most_targets), dtype="int32")
    target_ids = np.zeros((len(rows), most_targets), dtype="int32")
    weights = np.zeros((len(rows), most_targets), dtype="float32")
    for r, (row, target) in enumerate(zip(rows, targets)):
        token_ids[r, : len(row)] = row
        padding_mask[r, : len(row)] = True
        start = len(row) - len(target)
        positions[r, : len(target)] = np.arange(start - 1, len(row) - 1)
        target_ids[r, : len(target)] = target
        weights[r, : len(target)] = 1.0
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "images" in inputs:
        x["images"] = np.asarray(inputs["images"])[np.asarray(sample_of_row)]
    backbone = causal_lm.backbone
    hidden_states = backbone(x)
    hidden_states = ops.take_along_axis(
        hidden_states, ops.convert_to_tensor(positions)[:, :, None], axis=1
    )
    logits = ops.cast(
        backbone.token_embedding(hidden_states, reverse=True), "float32"
    )
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(
        log_probs, ops.convert_to_tensor(target_ids)[:, :, None], axis=-1
    )[:, :, 0]
    picked = ops.convert_to_numpy(picked).astype("float64")
    return (picked * weights).sum(axis=1) / weights.sum(axis=1)
