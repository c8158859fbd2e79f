"""The attention softmax, whose gradient keeps only its output, and the
softmax-weighted sum of values."""

import keras
from keras import ops


def attention_softmax(scores, axis=-1):
    """`keras.ops.softmax(scores, axis)`, same values and gradient.

    Its gradient, `p * (g - sum(g * p))`, needs only the output `p`.
    PyTorch's and TensorFlow's softmax already keep only that; JAX's
    (`jax.nn.softmax` unless `jax_softmax_custom_jvp` is set) is
    differentiated through its exponent, sum and division, and XLA's CPU
    compiler keeps three scores-sized arrays per attention for the
    backward pass instead of one (2 x 16.8 MB per decoder layer at the
    benchmark's "small" size, 2 x 67 MB per ViT layer at 448 pixels).
    """
    if keras.config.backend() != "jax":
        return ops.softmax(scores, axis=axis)
    return _jax_softmax(scores, axis)


def _jax_softmax(scores, axis):
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def softmax(x):
        return jax.nn.softmax(x, axis=axis)

    def forward(x):
        probabilities = jax.nn.softmax(x, axis=axis)
        return probabilities, probabilities

    def backward(probabilities, upstream):
        inner = jnp.sum(upstream * probabilities, axis=axis, keepdims=True)
        return (probabilities * (upstream - inner),)

    softmax.defvjp(forward, backward)
    return softmax(scores)


def softmax_weighted_sum(scores, values):
    """`ops.matmul(softmax(scores), values)`: scores (..., t, s), values
    (..., s, h), the softmax over s; the weights are cast to the values'
    dtype.

    On JAX the division by the softmax's sum comes after the product, on
    the (t, h) output instead of the (t, s) weights. XLA's CPU compiler
    fuses the exponent, the sum, the division and both products into one
    kernel; at the benchmark's "small" ViT, batch 4, (4, 4, 256, 64)
    heads, the attention took 1.8 ms so against 2.6 ms with the weights
    divided, 6-7% of the encoder. The backward pass keeps one
    scores-sized array, as `attention_softmax`'s does, and the (t, h)
    product before the division. The maximum is subtracted without a
    gradient (softmax does not depend on it). PyTorch and TensorFlow keep
    their fused softmax kernels.
    """
    if keras.config.backend() != "jax":
        probs = ops.cast(attention_softmax(scores), values.dtype)
        return ops.matmul(probs, values)
    top = ops.stop_gradient(ops.max(scores, axis=-1, keepdims=True))
    weights = ops.exp(scores - top)
    total = ops.sum(weights, axis=-1, keepdims=True)
    out = ops.matmul(ops.cast(weights, values.dtype), values)
    return out / ops.cast(total, out.dtype)
