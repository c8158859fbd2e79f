"""int8 weights through `QwenVLCausalLM.quantize("int8")`."""

import gc
import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl import QwenVLCausalLM
from tests.test_model import tiny_backbone
from tests.test_model import tiny_causal_lm

# Max abs logit difference / max abs float32 logit of the int8 golden model
# (weights and embedding rows in int8, activations quantized per token).
INT8_LOGITS_TOLERANCE = 0.1


@pytest.fixture(autouse=True)
def quick_collections():
    """Keras runs a full `gc.collect()` after deleting each float kernel it
    quantizes; with three frameworks loaded those collections dominate the
    test time, so the objects that exist beforehand are frozen (left out of
    collections) for the test's duration."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    gc.collect()


def relative_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def last_logits(causal_lm, x, lengths):
    """Logits (b, vocabulary) at each row's last prompt position."""
    hidden = causal_lm.backbone.predict_on_batch(x)  # one compiled call
    last = ops.take_along_axis(hidden, ops.reshape(lengths - 1, (-1, 1, 1)), 1)
    logits = causal_lm.backbone.token_embedding(last, reverse=True)
    return ops.convert_to_numpy(logits)[:, 0]


def quantized_layers(model):
    return {
        layer.path
        for layer in model._flatten_layers()
        if getattr(layer, "quantization_mode", None) == "int8"
    }


def test_quantize_int8_with_a_preprocessor_covers_embedding_and_lm_head(
    tmp_path,
):
    lm = tiny_causal_lm(str(tmp_path))
    backbone, preprocessor = lm.backbone, lm.preprocessor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.quantize("int8")  # the image converter's resizing is still unbuilt
    assert not [w for w in caught if "quantize" in str(w.message)]
    paths = quantized_layers(lm)
    assert backbone.token_embedding.path in paths  # embedding and lm_head
    block = backbone.transformer_layers[0]
    for layer in (
        block.attention.query,
        block.attention.attention_output,
        block.feedforward_gate_dense,
    ):
        assert layer.path in paths
    assert backbone.vision_encoder.proj.path in paths
    assert backbone.token_embedding.reverse_embeddings.dtype == "int8"
    assert not quantized_layers(preprocessor)


def test_quantize_filters_choose_layers():
    lm = QwenVLCausalLM(tiny_backbone(vision=False))
    lm.quantize("int8", filters="feedforward")
    paths = quantized_layers(lm)
    assert paths and all("feedforward" in path for path in paths)


def test_int8_golden_first_greedy_token_matches_float32(golden_hf_dir, golden):
    float32 = QwenVLCausalLM.from_preset(golden_hf_dir)
    int8 = QwenVLCausalLM.from_preset(golden_hf_dir)
    int8.quantize("int8")
    assert int8.backbone.token_embedding.quantization_mode == "int8"

    # All cases in one right-padded batch; the first greedy token of each is
    # the argmax at its last prompt position.
    cases = golden["cases"]
    lengths = np.array([len(case["input_ids"]) for case in cases])
    x = float32.preprocessor.generate_preprocess(
        {
            "prompts": [case["text"] for case in cases],
            "images": [
                [os.path.join(golden["images_dir"], n) for n in case["images"]]
                for case in cases
            ],
        },
        sequence_length=int(lengths.max()),
    )
    expected, got = (last_logits(lm, x, lengths) for lm in (float32, int8))
    for row, case in enumerate(cases):
        error = relative_error(got[row], expected[row])
        print(f"{case['name']}: int8 logits relative error {error:.4f}")
        assert error < INT8_LOGITS_TOLERANCE, case["name"]
        assert got[row].argmax() == expected[row].argmax(), case["name"]

    # The int8 generate path (cache, compiled loop) gives the same token.
    row = int(lengths.argmin())
    prompt = int(lengths[row])
    bare = QwenVLCausalLM(backbone=int8.backbone, preprocessor=None)
    bare.compile(sampler="greedy")
    one = int8.preprocessor.generate_preprocess(
        [cases[row]["text"]], sequence_length=prompt + 1
    )
    out = bare.generate(one, stop_token_ids=None)
    first = int(np.asarray(out["token_ids"])[0, prompt])
    assert first == expected[row].argmax()
    keras.backend.clear_session()


def test_int8_text_only_batch_runs_without_encoding():
    # A text-only batch has (b, 0, S, S, 3) images: the quantized encoder
    # must not run on the empty slots.
    backbone = tiny_backbone()
    backbone.quantize("int8")
    batch = {
        "token_ids": np.full((2, 16), 5, "int32"),
        "padding_mask": np.ones((2, 16), "int32"),
        "images": np.zeros((2, 0, 28, 28, 3), "float32"),
    }
    hidden = keras.ops.convert_to_numpy(backbone(batch))
    assert hidden.shape == (2, 16, 32)
    assert np.all(np.isfinite(hidden))
