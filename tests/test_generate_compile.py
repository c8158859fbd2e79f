"""`generate()` compiles once per padded shape.

keras-hub pads every prompt to `max_length` before the compiled generate
function sees it, so new prompts of other lengths reuse the trace. JAX
(`jax.jit`) and TensorFlow (`tf.function`) run the Python body of
`generate_step` only when they trace, so counting its calls counts traces.
PyTorch runs it eagerly on every call; there the test checks what a
compiler would key on: every call sees the same input shapes.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl import QwenVLCausalLM
from tests.test_model import tiny_causal_lm

MAX_LENGTH = 40
EAGER = keras.config.backend() == "torch"


@pytest.fixture
def causal_lm(tmp_path):
    """A tiny multimodal model with a byte-level preprocessor."""
    lm = tiny_causal_lm(str(tmp_path))
    lm.compile(sampler="greedy")
    return lm


def count_generate_steps(causal_lm, monkeypatch):
    """Wraps `generate_step`; returns the list of input shapes it saw."""
    seen = []
    step = causal_lm.generate_step

    def counting_step(inputs, stop_token_ids=None):
        seen.append({key: tuple(value.shape) for key, value in inputs.items()})
        return step(inputs, stop_token_ids)

    monkeypatch.setattr(causal_lm, "generate_step", counting_step)
    return seen


def test_new_prompt_lengths_do_not_retrace(causal_lm, monkeypatch):
    seen = count_generate_steps(causal_lm, monkeypatch)
    image = np.random.default_rng(0).uniform(0, 255, (28, 28, 3))
    prompts = [
        "<img>a</img>hello",
        "<img>a</img>a much longer prompt than before",
        "<img>a</img>hi",
    ]
    lengths = set()
    for prompt in prompts:
        x = causal_lm.preprocessor.generate_preprocess(
            {"prompts": [prompt], "images": [[image]]},
            sequence_length=MAX_LENGTH,
        )
        lengths.add(int(np.sum(ops.convert_to_numpy(x["padding_mask"]))))
        output = causal_lm.generate(
            {"prompts": prompt, "images": [image]},
            max_length=MAX_LENGTH,
            strip_prompt=True,
        )
        assert isinstance(output, str)
    assert len(lengths) == 3  # the prompts really differ in length
    assert len(seen) == (3 if EAGER else 1)
    assert all(shapes == seen[0] for shapes in seen)
    assert seen[0]["token_ids"] == (1, MAX_LENGTH)

    # Another padded length is another shape: the counter sees the trace.
    causal_lm.generate(
        {"prompts": prompts[0], "images": [image]}, max_length=MAX_LENGTH + 8
    )
    assert len(seen) == (4 if EAGER else 2)
    assert seen[-1]["token_ids"] == (1, MAX_LENGTH + 8)


def test_text_batches_of_other_lengths_do_not_retrace(causal_lm, monkeypatch):
    """Preprocessed batches (no preprocessor in the loop) of one padded
    shape share one trace whatever their prompt lengths."""
    bare = QwenVLCausalLM(causal_lm.backbone, preprocessor=None)
    bare.compile(sampler="greedy")
    seen = count_generate_steps(bare, monkeypatch)
    rng = np.random.default_rng(1)
    for lengths in ([3, 9], [12, 5], [7, 7]):
        ids = np.zeros((2, MAX_LENGTH), "int32")
        mask = np.zeros((2, MAX_LENGTH), "int32")
        for row, length in enumerate(lengths):
            ids[row, :length] = rng.integers(1, 200, length)
            mask[row, :length] = 1
        out = bare.generate(
            {"token_ids": ids, "padding_mask": mask}, stop_token_ids=None
        )
        # Prompts are kept and every position after them is generated.
        np.testing.assert_array_equal(
            np.asarray(out["token_ids"])[mask.astype(bool)], ids[mask.astype(bool)]
        )
        assert np.asarray(out["padding_mask"]).all()
    assert len(seen) == (3 if EAGER else 1)
    assert all(shapes == seen[0] for shapes in seen)
