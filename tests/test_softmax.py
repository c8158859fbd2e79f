"""`attention_softmax`: Keras' softmax, with a gradient that keeps only the
output on JAX."""

import keras
import numpy as np
import pytest
from keras import ops

from gradients import gradient

from keras_qwenvl.softmax import attention_softmax


def scores_batch(shape=(2, 3, 5, 7)):
    rng = np.random.default_rng(0)
    scores = (rng.normal(size=shape) * 3).astype("float32")
    scores[..., -2:] = -1e30  # masked keys
    scores[0, 0, 0, :] = -1e30  # a row with every key masked
    weights = rng.normal(size=shape).astype("float32")
    return scores, weights


def test_values_and_gradient_equal_keras_softmax():
    scores, weights = scores_batch()
    np.testing.assert_allclose(
        ops.convert_to_numpy(attention_softmax(scores)),
        ops.convert_to_numpy(ops.softmax(scores, axis=-1)),
        rtol=1e-6, atol=1e-7,
    )

    def weighted(softmax):
        return lambda x: ops.sum(softmax(x) * ops.convert_to_tensor(weights))

    ours = gradient(weighted(attention_softmax), scores)
    theirs = gradient(weighted(lambda x: ops.softmax(x, axis=-1)), scores)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.abs(ours).max() > 0.1  # the gradient is not zero


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of the compiled gradient (JAX)",
)
def test_jax_backward_keeps_fewer_scores_sized_arrays():
    """Attention-like chain: each layer's softmax is kept for the backward
    pass: with ours fewer scores-sized arrays are kept per layer."""
    import jax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 128, 32)).astype("float32")
    layers = 6

    def temp_bytes(softmax):
        def value(x):
            h = x
            for _ in range(layers):
                scores = ops.einsum("bnth,bnsh->bnts", h, h)
                h = ops.tanh(ops.einsum("bnts,bnsh->bnth", softmax(scores), h))
            return ops.sum(h)

        compiled = jax.jit(jax.grad(value)).lower(x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores_bytes = 2 * 4 * 128 * 128 * 4
    ours = temp_bytes(attention_softmax)
    theirs = temp_bytes(lambda s: ops.softmax(s, axis=-1))
    # about one array per layer (XLA keeps the last layer's either way)
    assert theirs - ours >= (layers - 1) * scores_bytes, (ours, theirs)
