"""`QwenVLCrossEntropy`: Keras' sparse cross-entropy from logits, without
the one-hot array of the vocabulary's size on JAX."""

import keras
import numpy as np
import pytest

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl import QwenVLCrossEntropy
from tests.test_model import tiny_backbone

KERAS_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batch(seed=0, shape=(3, 5), vocabulary=11, scale=4.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape + (vocabulary,)) * scale).astype("float32")
    labels = rng.integers(0, vocabulary, shape).astype("int32")
    weights = rng.uniform(0, 2, shape).astype("float32")
    weights[0, :2] = 0.0  # positions that carry no loss
    return labels, logits, weights


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_same_loss_as_keras_sparse_cross_entropy(scale):
    labels, logits, weights = batch(scale=scale)
    # Large logits: a naive log(sum(exp)) would overflow at 40 * N(0, 1).
    for sample_weight in (None, weights):
        ours = QwenVLCrossEntropy()(labels, logits, sample_weight)
        theirs = KERAS_LOSS(labels, logits, sample_weight)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours),
            keras.ops.convert_to_numpy(theirs),
            rtol=1e-6,
        )
    per_position = QwenVLCrossEntropy(reduction=None)(labels, logits)
    assert tuple(per_position.shape) == labels.shape


def one_step(loss, seed=3):
    """Weights of a Dense layer producing logits, before and after one
    SGD step."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, keras.layers.Dense(11)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    before = model.get_weights()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    labels, _, weights = batch(seed)
    model.train_on_batch(x, labels, sample_weight=weights)
    return before, model.get_weights()


def test_same_gradients_as_keras_sparse_cross_entropy():
    before, ours = one_step(QwenVLCrossEntropy())
    _, theirs = one_step(KERAS_LOSS)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[0], before[0])  # the step moved the kernel


def test_causal_lm_compiles_with_it_by_default():
    model = QwenVLCausalLM(tiny_backbone(vision=False))
    model.compile()
    assert isinstance(model.loss, QwenVLCrossEntropy)
    restored = keras.losses.deserialize(
        keras.losses.serialize(QwenVLCrossEntropy(reduction="sum"))
    )
    assert isinstance(restored, QwenVLCrossEntropy)
    assert restored.reduction == "sum"


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the one-hot array is Keras' JAX formulation; PyTorch and "
    "TensorFlow use Keras' op, checked above",
)
def test_jax_gradient_needs_one_vocabulary_array_less():
    import jax

    labels, logits, weights = batch(shape=(4, 64), vocabulary=4096)

    def temp_bytes(loss):
        def value(logits):
            return loss(labels, logits, weights)

        compiled = jax.jit(jax.grad(value)).lower(logits).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours, theirs = temp_bytes(QwenVLCrossEntropy()), temp_bytes(KERAS_LOSS)
    assert theirs - ours >= logits.nbytes, (ours, theirs)
