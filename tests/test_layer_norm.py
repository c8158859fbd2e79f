"""`QwenVLLayerNorm`: Keras' LayerNormalization with the same weights and
numbers, formulated so that XLA's CPU compiler does not recompute a deep
stack's residual gradients layer by layer."""

import keras
import numpy as np
import pytest

from keras_qwenvl.layer_norm import QwenVLLayerNorm


def pair(seed=0, shape=(None, None, 24), **kwargs):
    """Ours and Keras' layer with the same random gamma and beta."""
    ours = QwenVLLayerNorm(epsilon=1e-6, **kwargs)
    theirs = keras.layers.LayerNormalization(epsilon=1e-6, **kwargs)
    for layer in (ours, theirs):
        layer.build(shape)
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(1.0, 0.3, w.shape).astype("float32")
        for w in theirs.get_weights()
    ]
    for layer in (ours, theirs):
        layer.set_weights(weights)
    return ours, theirs


def test_same_weights_and_outputs_as_keras_layer_normalization():
    ours, theirs = pair()
    assert [w.path.split("/")[-1] for w in ours.weights] == ["gamma", "beta"]
    rng = np.random.default_rng(1)
    # An offset mean and a spread that a folded mean would round worse.
    x = (rng.normal(3.0, 2.0, (2, 7, 24))).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(x)),
        keras.ops.convert_to_numpy(theirs(x)),
        rtol=1e-5,
        atol=1e-5,
    )
    restored = QwenVLLayerNorm.from_config(ours.get_config())
    assert restored.get_config() == theirs.get_config() | {
        "name": ours.name
    }


def train_stack(norm_class, seed=2):
    """Weights after one SGD step on a 3-block residual stack."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 16))
    x = inputs
    for i in range(3):
        h = norm_class(epsilon=1e-6, name=f"norm_{i}")(x)
        x = x + keras.layers.Dense(16, name=f"dense_{i}")(h)
    model = keras.Model(inputs, x)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(4, 5, 16)).astype("float32")
    target = rng.normal(size=(4, 5, 16)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    model.train_on_batch(data, target)
    return [b - a for b, a in zip(before, model.get_weights())]


def test_gradients_equal_keras_layer_normalization():
    ours = train_stack(QwenVLLayerNorm)
    theirs = train_stack(keras.layers.LayerNormalization)
    assert min(np.abs(t).max() for t in theirs) > 1e-4  # every weight moved
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_half_precision_follows_keras(dtype):
    ours, theirs = pair(dtype=dtype)
    x = np.random.default_rng(3).normal(size=(2, 3, 24)).astype("float32")
    a, b = ours(x), theirs(x)
    assert keras.backend.standardize_dtype(a.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(b.dtype) == "bfloat16"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(a, "float32")),
        keras.ops.convert_to_numpy(keras.ops.cast(b, "float32")),
        atol=3e-2,
    )


def test_other_axes_use_the_keras_computation():
    ours, theirs = pair(axis=[1, 2], shape=(None, 7, 24))
    x = np.random.default_rng(4).normal(size=(2, 7, 24)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(x)),
        keras.ops.convert_to_numpy(theirs(x)),
        rtol=1e-6,
    )
