"""`narrow_products`' bfloat16 projections: a decoder block's Dense and
EinsumDense layers with their kernels read as 16 bits (JAX on CPU, in
generation's decoding steps)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl import narrow_products

JAX = keras.config.backend() == "jax"


def projection(kind, dtype="bfloat16"):
    """A built layer of each kind a decoder block has, random weights."""
    if kind == "mlp":
        layer = keras.layers.Dense(40, use_bias=False, dtype=dtype)
        shape = (2, 1, 64)
    elif kind == "dense_with_bias":
        layer = keras.layers.Dense(40, dtype=dtype)
        shape = (2, 1, 64)
    elif kind == "query":
        layer = keras.layers.EinsumDense(
            "btd,dnh->btnh", output_shape=(None, 4, 16), bias_axes="nh",
            dtype=dtype,
        )
        shape = (2, 1, 64)
    else:  # the attention's output
        layer = keras.layers.EinsumDense(
            "btnh,nhd->btd", output_shape=(None, 64), dtype=dtype
        )
        shape = (2, 1, 4, 16)
    layer.build(shape)
    rng = np.random.default_rng(0)
    layer.set_weights(
        [rng.normal(size=w.shape).astype("float32") for w in layer.weights]
    )
    inputs = ops.cast(rng.normal(size=shape).astype("float32"), dtype)
    return layer, inputs


@pytest.mark.parametrize(
    "kind", ["mlp", "dense_with_bias", "query", "attention_output"]
)
def test_bfloat16_projection_is_the_layers_call(kind):
    """The same outputs as the layer's call (bfloat16 rounding: the
    product rounded, then the bias added), where it applies: on JAX."""
    layer, inputs = projection(kind)
    assert narrow_products.bfloat16_projection_applies(layer, inputs) == JAX
    if not JAX:
        return
    ours = narrow_products.bfloat16_projection(layer, inputs)
    theirs = layer(inputs)
    assert ours.dtype == theirs.dtype
    assert tuple(ours.shape) == tuple(theirs.shape)
    ours, theirs = (
        np.asarray(ops.cast(t, "float32")) for t in (ours, theirs)
    )
    scale = np.abs(theirs).max()
    assert scale > 1
    np.testing.assert_allclose(ours, theirs, rtol=2.0**-7, atol=1e-3 * scale)


def test_bfloat16_projection_applies_only_to_plain_narrow_layers():
    """Not to float32 kernels, quantized or LoRA layers, nor to more rows
    than `BFLOAT16_MAX_ROWS` (a prompt's pass)."""
    layer, inputs = projection("mlp", dtype="float32")
    assert not narrow_products.bfloat16_projection_applies(layer, inputs)
    layer, inputs = projection("mlp")
    many = ops.concatenate([inputs] * 5, axis=0)  # 10 rows
    assert not narrow_products.bfloat16_projection_applies(layer, many)
    layer.enable_lora(2)
    assert not narrow_products.bfloat16_projection_applies(layer, inputs)
    layer, inputs = projection("query")
    layer.quantize("int8")
    assert not narrow_products.bfloat16_projection_applies(layer, inputs)
