"""`narrow_products`' projections for generation's decoding steps: a
decoder block's Dense and EinsumDense layers with their bfloat16 kernels
read as 16 bits (JAX on CPU), and with int8 kernels through
`torch._int_mm` (PyTorch on CPU) or widened inside the step (JAX on
CPU); and one row through an EinsumDense layer's float kernel as a
product of two rows on TensorFlow (`decoder.two_row_projection`)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl import decoder
from keras_qwenvl import narrow_products

JAX = keras.config.backend() == "jax"
TORCH = keras.config.backend() == "torch"
TENSORFLOW = keras.config.backend() == "tensorflow"
KINDS = ["mlp", "dense_with_bias", "query", "attention_output"]


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


@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("kind", KINDS)
def test_int8_projection_is_the_layers_call(kind):
    """An int8 layer's outputs, the same values as Keras' own int8 call
    (the same quantized activations, exact integer products, the same
    scaling), where it applies: on PyTorch and JAX."""
    layer, inputs = projection(kind, dtype="float32")
    layer.quantize("int8")
    if JAX:
        inputs = inputs[:1]  # one row, where it applies on JAX
    applies = TORCH or JAX
    assert narrow_products.int8_projection_applies(layer, inputs) == applies
    if not applies:
        return
    ours = narrow_products.int8_projection(layer, inputs)
    theirs = layer(inputs)
    assert tuple(ours.shape) == tuple(theirs.shape)
    ours, theirs = ops.convert_to_numpy(ours), ops.convert_to_numpy(theirs)
    assert np.abs(theirs).max() > 1
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_int8_projection_applies_only_to_plain_int8_layers():
    """Not to float kernels, LoRA on an int8 layer, nor an equation whose
    reduced axes are not the inputs' last (on PyTorch and JAX, where it
    applies at all); on JAX, not to more than `INT8_MAX_ROWS` rows (a
    prompt's pass, a batch's decoding step)."""
    layer, inputs = projection("query", dtype="float32")
    assert not narrow_products.int8_projection_applies(layer, inputs)
    layer.quantize("int8")
    applies = TORCH or JAX
    one = inputs[:1]
    assert narrow_products.int8_projection_applies(layer, one) == applies
    assert narrow_products.int8_projection_applies(layer, inputs) == TORCH
    output, heads = projection("attention_output", dtype="float32")
    output.quantize("int8")
    one = heads[:1]  # one row of 4 x 16
    assert narrow_products.int8_projection_applies(output, one) == applies
    assert narrow_products.int8_projection_applies(output, heads) == TORCH
    layer.enable_lora(2)
    assert not narrow_products.int8_projection_applies(layer, inputs)
    middle = keras.layers.EinsumDense("bdt,dn->btn", output_shape=(3, 6))
    middle.build((2, 16, 3))
    middle.quantize("int8")
    assert not narrow_products.int8_projection_applies(
        middle, ops.ones((2, 16, 3))
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["query", "attention_output"])
def test_two_row_projection_is_the_layers_call(kind, dtype):
    """One row's outputs, the layer's own values and dtype, on every
    backend (it applies on TensorFlow only)."""
    layer, inputs = projection(kind, dtype=dtype)
    one = inputs[:1]
    assert decoder.two_row_projection_applies(layer, one) == TENSORFLOW
    ours = decoder.two_row_projection(layer, one)
    theirs = layer(one)
    assert ours.dtype == theirs.dtype
    assert tuple(ours.shape) == tuple(theirs.shape)
    ours, theirs = (
        np.asarray(ops.convert_to_numpy(ops.cast(t, "float32")))
        for t in (ours, theirs)
    )
    assert np.abs(theirs).max() > 1
    if dtype == "float32":
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(
            ours, theirs, rtol=2.0**-7, atol=1e-2 * scale
        )


def test_two_row_projection_applies_only_to_one_row_of_plain_einsums():
    """Not to more rows, Dense layers, int8 or LoRA layers, nor an
    equation whose reduced axes are not the inputs' last."""
    layer, inputs = projection("query", dtype="float32")
    assert decoder.two_row_projection_applies(layer, inputs[:1]) == (
        TENSORFLOW
    )
    assert not decoder.two_row_projection_applies(layer, inputs)  # 2 rows
    dense, dense_inputs = projection("mlp", dtype="float32")
    assert not decoder.two_row_projection_applies(dense, dense_inputs[:1])
    layer.enable_lora(2)
    assert not decoder.two_row_projection_applies(layer, inputs[:1])
    layer, inputs = projection("attention_output", dtype="float32")
    layer.quantize("int8")
    assert not decoder.two_row_projection_applies(layer, inputs[:1])
    middle = keras.layers.EinsumDense("bdt,dn->btn", output_shape=(3, 6))
    middle.build((1, 16, 3))
    assert not decoder.two_row_projection_applies(
        middle, ops.ones((1, 16, 3))
    )


def test_quantize_rows_is_keras_abs_max_quantizer():
    """The activations' int8 values and scales of Keras' `AbsMaxQuantizer`
    over the last axis, on every backend (zero rows included)."""
    from keras.quantizers import AbsMaxQuantizer

    quantizer = AbsMaxQuantizer(axis=-1)
    rows = np.random.default_rng(1).normal(0, 3, (3, 2, 64))
    rows[1, 0] = 0.0
    rows = ops.convert_to_tensor(rows.astype("float32"))
    ours = narrow_products.quantize_rows(quantizer, rows)
    theirs = quantizer(rows)
    for a, b in zip(ours, theirs):
        assert keras.backend.standardize_dtype(a.dtype) == (
            keras.backend.standardize_dtype(b.dtype)
        )
        np.testing.assert_array_equal(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b)
        )


def int8_table():
    """PyTorch: a function quantizing activations as Keras' int8 layers
    do, a random int8 (1000, 64) table, and the generator that made it."""
    import torch
    from keras.quantizers import AbsMaxQuantizer

    quantizer = AbsMaxQuantizer(axis=-1)
    generator = torch.Generator().manual_seed(0)
    table = torch.randint(-127, 128, (1000, 64), dtype=torch.int8,
                          generator=generator)

    def quantize(hidden):
        return narrow_products.quantize_rows(quantizer, hidden)[0]

    return quantize, table, generator


@pytest.mark.skipif(not TORCH, reason="torch._int_mm is PyTorch's")
@pytest.mark.parametrize("rows", [1, 3])
def test_int_mm_of_rows_made_in_a_compiled_graph(rows):
    """`int_mm` of activations quantized inside a `torch.compile`d graph
    gives the eager integers, one row included (Inductor hands that row to
    ATen with a stride of 0, which `torch._int_mm` alone misreads)."""
    import torch

    quantize, table, generator = int8_table()

    def logits(hidden):
        quantized = quantize(hidden)
        return narrow_products.int_mm(quantized.reshape(-1, 64), table.t())

    hidden = torch.randn(rows, 1, 64, generator=generator)
    eager = logits(hidden)
    assert eager.abs().max() > 1000
    compiled = torch.compile(logits, fullgraph=True, dynamic=False)(hidden)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.skipif(not TORCH, reason="torch.compile is PyTorch's")
def test_compiled_one_row_product_is_the_integer_product():
    """Under `torch.compile` (with the options an int8 model's decoding
    step compiles with), `product` of one row quantized inside the graph
    is a multiply and a sum: the same integers as `torch._int_mm`
    eagerly."""
    import torch

    from keras_qwenvl import torch_decoding

    quantize, table, generator = int8_table()

    def logits(hidden):
        return narrow_products.product(quantize(hidden), table)

    hidden = torch.randn(1, 1, 64, generator=generator)
    eager = logits(hidden)
    assert eager.dtype == torch.int32 and eager.abs().max() > 1000
    compiled = torch.compile(
        logits, fullgraph=True, dynamic=False,
        options=torch_decoding.INT8_INDUCTOR_OPTIONS,
    )(hidden)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager.float(), rtol=0, atol=0)
