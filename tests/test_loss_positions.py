"""Logits only at the labels that carry loss (`num_loss_positions`): the
same loss, gradients and metrics as logits at every position, on every
backend, from the preprocessor, the data loader and `fit()`."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.causal_lm_preprocessor import select_loss_positions
from keras_qwenvl.data import loader as data_loader
from keras_qwenvl.data import synthetic
from keras_qwenvl.image_converter import QwenVLImageConverter
from tests.test_model import IMG
from tests.test_model import span
from tests.test_model import tiny_backbone

SIZE = 28  # image size of the tiny vision encoder


def test_select_gathers_labels_scales_weights_and_refuses_to_drop():
    y = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    weights = np.array(
        [[0, 1, 1, 0, 0, 1], [2, 0, 0, 0, 0, 0]], "float32"
    )
    x = {"token_ids": y - 1}
    x_k, y_k, w_k = select_loss_positions(x, y, weights, 4)
    np.testing.assert_array_equal(
        x_k["loss_positions"], [[1, 2, 5, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(x_k["token_ids"], x["token_ids"])
    # Unused slots get label 0 and weight 0.
    np.testing.assert_array_equal(y_k, [[11, 12, 15, 0], [20, 0, 0, 0]])
    # Scaled by k / t = 4 / 6: sum(w * loss) / (b * k) is unchanged.
    np.testing.assert_allclose(
        w_k, np.array([[1, 1, 1, 0], [2, 0, 0, 0]]) * 4 / 6
    )
    with pytest.raises(ValueError, match="Row 0 has 3 labels .* = 2"):
        select_loss_positions(x, y, weights, 2)


def multimodal_batch(seed=0):
    """Two rows with an image span each; loss off the span and the first
    (prompt) tokens, as the preprocessor would weigh them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(2):
        text = list(rng.integers(1, IMG, 9))
        rows.append(text[:3] + span() + text[3:])
    ids = np.array(rows, "int32")
    x = {
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "images": rng.standard_normal((2, 1, SIZE, SIZE, 3)).astype("float32"),
    }
    y = np.roll(ids, -1, axis=1)
    weights = (ids < IMG) & (y < IMG)
    weights[:, :2] = False  # a prompt
    weights[1, -3:] = False  # a shorter response
    weights[:, -1] = False
    return x, y, weights.astype("float32")


def to_np(x):
    return ops.convert_to_numpy(x)


def test_logits_at_loss_positions_equal_the_full_logits():
    model = QwenVLCausalLM(tiny_backbone())
    x, y, weights = multimodal_batch()
    full = to_np(model(x))
    positions = np.array([[0, 1, 12, 12, 14], [14, 3, 2, 0, 9]], "int32")
    part = to_np(model({**x, "loss_positions": positions}))
    assert part.shape == (2, 5, full.shape[-1])
    np.testing.assert_allclose(
        part, np.take_along_axis(full, positions[..., None], 1), atol=1e-6
    )


def test_training_step_equals_the_full_step():
    """Same loss, token accuracy and updated weights, with every weight
    trainable (plain SGD, so updates are the gradients themselves)."""
    x, y, weights = multimodal_batch(seed=1)
    results = []
    for selected in (False, True):
        model = QwenVLCausalLM(tiny_backbone())  # seeded: same weights
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy("acc")],
        )
        batch = (x, y, weights)
        if selected:
            batch = select_loss_positions(x, y, weights, 8)
            assert batch[1].shape == (2, 8)
        logs = model.train_on_batch(*batch, return_dict=True)
        results.append((logs, [to_np(v) for v in model.weights]))
    (full_logs, full_weights), (logs, weights_after) = results
    assert logs["loss"] == pytest.approx(full_logs["loss"], rel=1e-5)
    assert logs["acc"] == pytest.approx(full_logs["acc"], abs=1e-7)
    moved = 0
    for before, after in zip(full_weights, weights_after):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
    # The step did train (a weight of the vision encoder moved).
    initial = QwenVLCausalLM(tiny_backbone()).weights
    for start, after in zip(initial, weights_after):
        moved += not np.allclose(to_np(start), after)
    assert moved > len(initial) // 2


@pytest.fixture(scope="module")
def preprocessors(byte_tokenizer):
    converter = QwenVLImageConverter(image_size=(SIZE, SIZE))
    full = QwenVLCausalLMPreprocessor(
        byte_tokenizer, converter, sequence_length=352
    )
    selected = QwenVLCausalLMPreprocessor(
        byte_tokenizer, converter, sequence_length=352, num_loss_positions=80
    )
    return full, selected


def captions(count, seed=0):
    return synthetic.synthetic_examples(
        "caption", count, seed=seed, image_size=56
    )


def test_preprocessor_gathers_the_weighted_labels(preprocessors):
    full, selected = preprocessors
    examples = captions(3)
    inputs = {
        "prompts": [e["prompts"] for e in examples],
        "responses": [e["responses"] for e in examples],
        "images": [e["images"] for e in examples],
    }
    x, y, weights = full(inputs)
    x_k, y_k, w_k = selected(inputs)
    y, weights = to_np(y), to_np(weights)
    positions = to_np(x_k["loss_positions"])
    assert positions.shape == to_np(y_k).shape == to_np(w_k).shape == (3, 80)
    for row in range(3):
        kept = np.flatnonzero(weights[row])
        assert 0 < len(kept) <= 80
        np.testing.assert_array_equal(positions[row, : len(kept)], kept)
        np.testing.assert_array_equal(to_np(y_k)[row, : len(kept)], y[row, kept])
        assert not to_np(w_k)[row, len(kept) :].any()
    np.testing.assert_array_equal(to_np(x_k["token_ids"]), to_np(x["token_ids"]))
    # A single sample keeps its unbatched shapes.
    one = {key: value[0] for key, value in inputs.items()}
    x_one, y_one, _ = selected(one)
    assert to_np(x_one["loss_positions"]).shape == to_np(y_one).shape == (80,)

    restored = QwenVLCausalLMPreprocessor.from_config(selected.get_config())
    assert restored.num_loss_positions == 80
    too_few = QwenVLCausalLMPreprocessor(
        full.tokenizer,
        full.image_converter,
        sequence_length=352,
        num_loss_positions=2,
    )
    with pytest.raises(ValueError, match="labels that carry loss, more than"):
        too_few(inputs)
    for bad in (0, -3, 2.5, "all"):
        with pytest.raises(ValueError, match="num_loss_positions"):
            QwenVLCausalLMPreprocessor(full.tokenizer, num_loss_positions=bad)


def test_loader_and_fit_use_the_preprocessors_setting(preprocessors):
    tf = pytest.importorskip("tensorflow")
    full, selected = preprocessors
    examples = captions(4, seed=3)
    loader = data_loader.QwenVLDataLoader(
        examples, selected, batch_size=2, shuffle=False
    )
    plain = data_loader.QwenVLDataLoader(
        examples, full, batch_size=2, shuffle=False
    )
    for (x_k, y_k, w_k), (x, y, w) in zip(loader, plain):
        expected = select_loss_positions(x, y, w, 80)
        keras.tree.map_structure(
            np.testing.assert_array_equal, (x_k, y_k, w_k), expected
        )
    x_spec, y_spec, w_spec = loader.tf_dataset().element_spec
    assert x_spec["loss_positions"].shape == y_spec.shape == w_spec.shape
    assert y_spec.shape == (2, 80) and x_spec["token_ids"].shape == (2, 352)
    assert isinstance(x_spec["loss_positions"], tf.TensorSpec)

    # fit() on raw examples goes through the same loader.
    keras.utils.set_random_seed(0)
    from tests.test_data_loader import causal_lm

    model = causal_lm(selected.tokenizer, selected)
    before = to_np(model.backbone.token_embedding.embeddings)
    history = model.fit(examples, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = to_np(model.backbone.token_embedding.embeddings)
    assert not np.array_equal(before, after)
