"""The Keras model against outputs of the original PyTorch Qwen-VL.

Everything goes through `from_preset` on the golden checkpoint in its Hugging
Face layout, and every tolerance is the one of ../shared/golden/README.md.
Skips cleanly when ../shared is absent.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_qwenvl
from keras_qwenvl import QwenVLCausalLM

FEATURE_TOLERANCE = 1e-4  # max abs diff / max abs reference
PIXEL_TOLERANCE = 2e-2
MARGIN_TOLERANCE = 1e-3  # greedy steps closer than this may differ


def relative_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def causal_lm(golden_hf_dir):
    return QwenVLCausalLM.from_preset(golden_hf_dir)


@pytest.fixture(scope="module")
def cases(golden):
    return list(enumerate(golden["cases"]))


def image_paths(golden, case):
    return [os.path.join(golden["images_dir"], name) for name in case["images"]]


def preprocess(causal_lm, golden, case, sequence_length):
    return causal_lm.preprocessor.generate_preprocess(
        {"prompts": [case["text"]], "images": [image_paths(golden, case)]},
        sequence_length=sequence_length,
    )


def forward(causal_lm, golden, index, case):
    """Hidden states and logits of one golden case (one pass)."""
    length = len(case["input_ids"])
    x = preprocess(causal_lm, golden, case, length)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(x["token_ids"])[0], case["input_ids"]
    )
    hidden = causal_lm.backbone(x)
    logits = causal_lm.backbone.token_embedding(hidden, reverse=True)
    return x, ops.convert_to_numpy(hidden)[0], ops.convert_to_numpy(logits)[0]


def assert_greedy_matches(got, expected, margins, name):
    for step, (g, e, margin) in enumerate(zip(got, expected, margins)):
        if margin < MARGIN_TOLERANCE:
            return  # a near tie: this step and the rest are not compared
        assert g == e, f"{name}: greedy step {step}: {g} != {e}"


def greedy_ids(causal_lm, golden, case):
    new = len(case["greedy_new_ids"])
    prompt = len(case["input_ids"])
    x = preprocess(causal_lm, golden, case, prompt + new)
    bare = QwenVLCausalLM(backbone=causal_lm.backbone, preprocessor=None)
    bare.compile(sampler="greedy")
    out = bare.generate(x, stop_token_ids=None)
    return list(np.asarray(out["token_ids"])[0, prompt:])


def test_preset_config_and_pixels(causal_lm, golden, cases):
    backbone = causal_lm.backbone
    assert isinstance(backbone, keras_qwenvl.QwenVLBackbone)
    assert backbone.seq_length == 512
    assert backbone.use_dynamic_ntk and backbone.use_logn_attn
    assert backbone.vision_encoder.image_size == golden["image_size"]
    converter = causal_lm.preprocessor.image_converter
    for index, case in cases:
        for k, path in enumerate(image_paths(golden, case)):
            pixels = ops.convert_to_numpy(converter(path))
            expected = golden["arrays"][f"{index}_pixels"][k]
            assert np.max(np.abs(pixels - expected)) < PIXEL_TOLERANCE


def test_image_features(causal_lm, golden, cases):
    for index, case in cases:
        if not case["images"]:
            continue
        pixels = golden["arrays"][f"{index}_pixels"]
        features = ops.convert_to_numpy(causal_lm.backbone.vision_encoder(pixels))
        expected = golden["arrays"][f"{index}_image_features"]
        assert relative_error(features, expected) < FEATURE_TOLERANCE, case["name"]


def test_hidden_states_logits_and_argmax(causal_lm, golden, cases):
    image_token = causal_lm.preprocessor.tokenizer.image_start_token_id
    for index, case in cases:
        x, hidden, logits = forward(causal_lm, golden, index, case)
        arrays = golden["arrays"]
        assert (
            relative_error(hidden, arrays[f"{index}_last_hidden"])
            < FEATURE_TOLERANCE
        ), case["name"]
        assert (
            relative_error(logits[-3:], arrays[f"{index}_logits_tail"])
            < FEATURE_TOLERANCE
        ), case["name"]
        ids = np.asarray(case["input_ids"])
        in_span = np.zeros(len(ids), bool)
        for start in np.flatnonzero(ids == image_token):
            in_span[start + 1 : start + 257] = True
        argmax = logits.argmax(-1)
        top1 = arrays[f"{index}_top5"][:, 0]
        np.testing.assert_array_equal(
            argmax[~in_span], top1[~in_span], err_msg=case["name"]
        )


def test_greedy_generation_with_cache(causal_lm, golden, cases):
    for index, case in cases:
        got = greedy_ids(causal_lm, golden, case)
        assert_greedy_matches(
            got,
            case["greedy_new_ids"],
            case["greedy_top2_margins"],
            case["name"],
        )


def test_generate_text_end_to_end(causal_lm, golden, cases):
    """Strings in, strings out: the prompt's completion is the golden text."""
    index, case = cases[0]
    tokenizer = causal_lm.preprocessor.tokenizer
    causal_lm.compile(sampler="greedy")
    new = case["greedy_new_ids"]
    output = causal_lm.generate(
        {"prompts": case["text"], "images": image_paths(golden, case)},
        max_length=len(case["input_ids"]) + len(new),
        strip_prompt=True,
    )
    assert isinstance(output, str)
    assert output == tokenizer.detokenize(new)


def test_batched_golden_generation(causal_lm, golden, cases):
    """Prompts of different lengths and image counts in one batch."""
    chosen = [cases[i] for i in (0, 1, 2)]
    steps = min(len(c["greedy_new_ids"]) for _, c in chosen)
    length = max(len(c["input_ids"]) for _, c in chosen) + steps
    x = causal_lm.preprocessor.generate_preprocess(
        {
            "prompts": [c["text"] for _, c in chosen],
            "images": [image_paths(golden, c) for _, c in chosen],
        },
        sequence_length=length,
    )
    bare = QwenVLCausalLM(backbone=causal_lm.backbone, preprocessor=None)
    bare.compile(sampler="greedy")
    out = np.asarray(bare.generate(x, stop_token_ids=None)["token_ids"])
    for row, (_, case) in enumerate(chosen):
        start = len(case["input_ids"])
        assert_greedy_matches(
            list(out[row, start : start + steps]),
            case["greedy_new_ids"][:steps],
            case["greedy_top2_margins"],
            case["name"],
        )


def test_bfloat16_end_to_end(golden_hf_dir, golden, cases, causal_lm):
    """bfloat16 runs the whole pipeline; the first greedy token of every case
    agrees with float32."""
    lm16 = QwenVLCausalLM.from_preset(golden_hf_dir, dtype="bfloat16")
    assert lm16.backbone.compute_dtype == "bfloat16"
    for _, case in cases:
        prompt = len(case["input_ids"])
        x = preprocess(lm16, golden, case, prompt + 1)
        bare = QwenVLCausalLM(backbone=lm16.backbone, preprocessor=None)
        bare.compile(sampler="greedy")
        first = int(np.asarray(bare.generate(x, stop_token_ids=None)["token_ids"])[0, prompt])
        assert first == greedy_ids(causal_lm, golden, case)[0], case["name"]


def test_save_to_preset_round_trip(causal_lm, golden, cases, tmp_path):
    import keras_hub

    index, case = cases[1]  # two images
    _, _, logits = forward(causal_lm, golden, index, case)
    causal_lm.save_to_preset(str(tmp_path))
    for loader in (QwenVLCausalLM, keras_hub.models.CausalLM):
        restored = loader.from_preset(str(tmp_path))
        assert isinstance(restored, QwenVLCausalLM)
        _, _, again = forward(restored, golden, index, case)
        np.testing.assert_array_equal(again, logits)
    keras.backend.clear_session()


def test_chat_two_images(causal_lm, golden, cases):
    """`chat()` builds the golden chat prompt (ChatML, numbered pictures) and
    answers with the original's greedy reply; the history carries the turn."""
    _, case = cases[1]
    query = case["text"].split("Picture 2: <img>rocket.jpg</img>\n")[1]
    query = query.split("<|im_end|>")[0]
    preprocessor = causal_lm.preprocessor
    preprocessor.image_dir = golden["images_dir"]
    causal_lm.compile(sampler="greedy")
    try:
        response, history = causal_lm.chat(
            query,
            images=case["images"],
            max_length=len(case["input_ids"]) + len(case["greedy_new_ids"]),
        )
    finally:
        preprocessor.image_dir = None
    expected = preprocessor.tokenizer.detokenize(case["greedy_new_ids"])
    assert response == expected.strip()
    assert len(history) == 1
    past_query, past_response, past_images = history[0]
    assert past_query.startswith("Picture 1: <img>coffee.png</img>\n")
    assert past_response == response
    assert past_images == case["images"]
