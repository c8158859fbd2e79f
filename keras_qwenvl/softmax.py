"""The attention softmax, whose gradient keeps only its output, the
softmax-weighted sum of values, and the attention of heads-first
queries, keys and values built on them."""

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


# Bytes of float32 scores above which JAX computes attention one head at
# a time (`attention_weighted_sum`).
HEAD_LOOP_BYTES = 1 << 25


def attention_weighted_sum(query, key, value, mask=None, loop_heads=True):
    """`softmax(query @ key^T) @ value` for heads-first query (b, n, t, h)
    and key and value (b, n, s, h); the scores in float32, where the
    optional bool `mask` (t, s), shared by every row and head, is False
    they are -1e30. Returns (b, n, t, h).

    On JAX, with `loop_heads` and scores of more than `HEAD_LOOP_BYTES`,
    the heads of every row are computed one at a time inside a loop, so
    that each head's scores stay in cache between their product, their
    softmax and the product with the values, instead of a (b, n, t, s)
    array written to memory and read back. The same values. The "base"
    ViT at batch 4 (4 x 8 heads of 1,024 x 1,024 scores, 134 MB; an Intel
    Xeon with 2 MB of L2 per core): 64 against 151 ms a layer for this
    product, about 40% of a block's time before; XLA's batched product
    with 64-wide heads ran at 128 GFLOP/s against 181 for one head's.
    Training calls pass `loop_heads=False`: under a gradient the loop's
    saved values took more memory (the "base" training step with remat:
    11.33 against 9.28 GB, as fast).
    """

    def heads(q, k, v):
        scores = ops.cast(ops.einsum("bnth,bnsh->bnts", q, k), "float32")
        if mask is not None:
            scores = ops.where(
                mask[None, None], scores, ops.full_like(scores, -1e30)
            )
        return softmax_weighted_sum(scores, v)

    rows, count, length = query.shape[:3]
    sources = key.shape[2]
    if (
        keras.config.backend() != "jax"
        or not loop_heads
        or None in (rows, count, length, sources)
        or rows * count == 1
        or rows * count * length * sources * 4 <= HEAD_LOOP_BYTES
    ):
        return heads(query, key, value)

    def one_head(arrays):
        return heads(*(ops.reshape(x, (1, 1) + x.shape) for x in arrays))

    out = ops.map(
        one_head,
        tuple(
            ops.reshape(x, (rows * count,) + x.shape[2:])
            for x in (query, key, value)
        ),
    )
    return ops.reshape(out, (rows, count, length, value.shape[-1]))
