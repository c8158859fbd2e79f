"""`attention_softmax`: Keras' softmax, with a gradient that keeps only the
output on JAX; `softmax_weighted_sum`: softmax(scores) @ values;
`attention_weighted_sum`: the attention of heads-first queries, keys and
values, one head at a time on JAX for large scores."""

import keras
import numpy as np
import pytest
from keras import ops

from gradients import gradient

from keras_qwenvl import softmax
from keras_qwenvl.softmax import attention_softmax
from keras_qwenvl.softmax import attention_weighted_sum
from keras_qwenvl.softmax import softmax_weighted_sum


def scores_batch(shape=(2, 3, 5, 7)):
    rng = np.random.default_rng(0)
    scores = (rng.normal(size=shape) * 3).astype("float32")
    scores[..., -2:] = -1e30  # masked keys
    scores[0, 0, 0, :] = -1e30  # a row with every key masked
    weights = rng.normal(size=shape).astype("float32")
    return scores, weights


LAYERS = 6


def chain_temp_bytes(weighted_sum):
    """XLA's temporary bytes for the gradient of an attention-like chain
    of `LAYERS` layers on (2, 4, 128, 32) inputs (JAX): each layer
    `tanh(weighted_sum(h @ h.T, h))`, whose softmax weights the backward
    pass may keep."""
    import jax

    x = np.random.default_rng(0).normal(size=(2, 4, 128, 32))

    def value(x):
        h = x
        for _ in range(LAYERS):
            scores = ops.einsum("bnth,bnsh->bnts", h, h)
            h = ops.tanh(weighted_sum(scores, h))
        return ops.sum(h)

    compiled = jax.jit(jax.grad(value)).lower(x.astype("float32")).compile()
    return compiled.memory_analysis().temp_size_in_bytes


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
    def temp_bytes(softmax):
        return chain_temp_bytes(lambda s, v: ops.matmul(softmax(s), v))

    scores_bytes = 2 * 4 * 128 * 128 * 4
    ours = temp_bytes(attention_softmax)
    theirs = temp_bytes(lambda s: ops.softmax(s, axis=-1))
    # about one array per layer (XLA keeps the last layer's either way)
    assert theirs - ours >= (LAYERS - 1) * scores_bytes, (ours, theirs)


def keras_weighted_sum(scores, values):
    probs = ops.cast(ops.softmax(scores, axis=-1), values.dtype)
    return ops.matmul(probs, values)


def test_weighted_sum_values_and_gradients_equal_keras():
    """Masked keys, a fully masked row, and the gradient of the scores and
    of the values."""
    scores, _ = scores_batch()
    rng = np.random.default_rng(1)
    values = rng.normal(size=(2, 3, 7, 4)).astype("float32")
    upstream = ops.convert_to_tensor(
        rng.normal(size=(2, 3, 5, 4)).astype("float32")
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(softmax_weighted_sum(scores, values)),
        ops.convert_to_numpy(keras_weighted_sum(scores, values)),
        rtol=1e-5, atol=1e-6,
    )
    for argument in (0, 1):

        def loss(function, x):
            inputs = [scores, values]
            inputs[argument] = x
            return ops.sum(function(*inputs) * upstream)

        start = (scores, values)[argument]
        ours = gradient(lambda x: loss(softmax_weighted_sum, x), start)
        theirs = gradient(lambda x: loss(keras_weighted_sum, x), start)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
        assert np.abs(ours).max() > 0.1


def test_weighted_sum_in_bfloat16():
    scores, _ = scores_batch()
    values = np.random.default_rng(1).normal(size=(2, 3, 7, 4))
    values = ops.cast(values, "bfloat16")
    out = softmax_weighted_sum(scores, values)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(out, "float32")),
        ops.convert_to_numpy(
            ops.cast(keras_weighted_sum(scores, values), "float32")
        ),
        rtol=2e-2, atol=2e-2,
    )


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the order of the division in XLA's compiled function (JAX)",
)
def test_jax_divides_the_output_and_keeps_one_scores_array():
    """The compiled function divides no scores-sized array, and its
    gradient keeps the scores-sized arrays `attention_softmax`'s keeps."""
    import jax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 128, 32)).astype("float32")
    hlo = (
        jax.jit(lambda x: softmax_weighted_sum(x @ x.swapaxes(-1, -2), x))
        .lower(x)
        .compile()
        .as_text()
    )
    # XLA may turn the division into a reciprocal and a product; both keep
    # the division's op name.
    division = [line for line in hlo.splitlines() if '/div"' in line]
    assert any("f32[2,4,128,32]" in line for line in division), division
    assert not any("f32[2,4,128,128]" in line for line in division)
    ours = chain_temp_bytes(softmax_weighted_sum)
    kept = chain_temp_bytes(lambda s, v: ops.matmul(attention_softmax(s), v))
    # the same scores-sized arrays; the division's gradient adds the
    # (t, h) product before it, a quarter of a scores array here
    product_bytes = 2 * 4 * 128 * 32 * 4
    assert ours <= kept + LAYERS * product_bytes, (ours, kept)


def attention_inputs():
    rng = np.random.default_rng(2)
    query = rng.normal(size=(2, 3, 5, 4)).astype("float32")
    key, value = rng.normal(size=(2, 2, 3, 7, 4)).astype("float32")
    mask = rng.random((5, 7)) > 0.3
    mask[:, 0] = True  # every query sees a key
    return query, key, value, mask


def keras_attention(query, key, value, mask):
    scores = ops.einsum("bnth,bnsh->bnts", query, key)
    scores = ops.where(mask[None, None], scores, -1e30)
    return keras_weighted_sum(scores, value)


@pytest.mark.parametrize("limit", [0, 1 << 25])
def test_attention_values_and_gradients_equal_keras(monkeypatch, limit):
    """With any scores size (0: JAX loops over the six heads), the values
    and the gradients of the query, key and value are Keras' softmax
    attention's, masked keys ignored."""
    monkeypatch.setattr(softmax, "HEAD_LOOP_BYTES", limit)
    query, key, value, mask = attention_inputs()
    np.testing.assert_allclose(
        ops.convert_to_numpy(attention_weighted_sum(query, key, value, mask)),
        ops.convert_to_numpy(keras_attention(query, key, value, mask)),
        rtol=1e-5, atol=1e-6,
    )
    upstream = np.random.default_rng(3).normal(size=(2, 3, 5, 4))
    upstream = ops.convert_to_tensor(upstream.astype("float32"))
    for argument in range(3):

        def loss(function, x):
            inputs = [query, key, value]
            inputs[argument] = x
            return ops.sum(function(*inputs, mask) * upstream)

        start = (query, key, value)[argument]
        ours = gradient(lambda x: loss(attention_weighted_sum, x), start)
        theirs = gradient(lambda x: loss(keras_attention, x), start)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
        assert np.abs(ours).max() > 0.1


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the loop over heads in XLA's compiled function (JAX)",
)
def test_jax_large_scores_are_computed_one_head_at_a_time(monkeypatch):
    """Scores above `HEAD_LOOP_BYTES` are never a (rows, heads, t, s)
    array: a loop computes one head's; below it, one batched product."""
    import jax

    query, key, value, mask = attention_inputs()

    def compiled():
        function = jax.jit(
            lambda q, k, v: attention_weighted_sum(q, k, v, mask)
        )
        return function.lower(query, key, value).compile().as_text()

    whole = compiled()
    assert "f32[2,3,5,7]" in whole and " while(" not in whole
    # Just below this example's 2 x 3 x 5 x 7 float32 scores.
    monkeypatch.setattr(softmax, "HEAD_LOOP_BYTES", 2 * 3 * 5 * 7 * 4 - 1)
    looped = compiled()
    assert " while(" in looped
    assert "f32[2,3,5,7]" not in looped
    # Training calls keep one batched product (`loop_heads=False`).
    training = jax.jit(
        lambda q, k, v: attention_weighted_sum(q, k, v, mask, False)
    )
    text = training.lower(query, key, value).compile().as_text()
    assert "f32[2,3,5,7]" in text and " while(" not in text


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the loop over heads in XLA's compiled function (JAX)",
)
def test_jax_attention_layer_loops_over_heads_outside_training(monkeypatch):
    """The attention layer (ViT and adapter) loops over the heads of large
    scores in inference, not in a training call (where the loop's saved
    values took more memory), also inside a ViT block, which passes its
    `training` on; the same values either way."""
    import jax

    from keras_qwenvl.adapter import QwenVLMultiHeadAttention
    from keras_qwenvl.vision_encoder import QwenVLVisionBlock

    monkeypatch.setattr(softmax, "HEAD_LOOP_BYTES", 0)
    x = np.random.default_rng(4).normal(size=(2, 6, 8)).astype("float32")
    for layer in (
        QwenVLMultiHeadAttention(num_heads=2, head_dim=4),
        QwenVLVisionBlock(num_heads=2, intermediate_dim=16),
    ):
        layer.build(x.shape)
        variables = [v.value for v in layer.trainable_variables]
        outputs, texts = [], []
        for training in (False, True):

            def call(variables, x, layer=layer, training=training):
                return layer.stateless_call(
                    variables, [], x, training=training
                )[0]

            function = jax.jit(call)
            outputs.append(np.asarray(function(variables, x)))
            texts.append(function.lower(variables, x).compile().as_text())
        assert " while(" in texts[0] and " while(" not in texts[1], layer
        np.testing.assert_allclose(
            outputs[0], outputs[1], rtol=1e-5, atol=1e-6
        )
