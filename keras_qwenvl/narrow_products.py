"""Products with narrow (int8, bfloat16) weights on CPU.

int8 (`product`), on every backend. Keras' int8 lm_head multiplies int8
activations by the int8 table with `ops.matmul`, which on CPU is the
slowest product of a decoding step: XLA (JAX, TensorFlow) multiplies int8
by int8 into int32 without vector instructions, or hoists a float32 copy
of the table out of the decoding loop and reads that at every step, and
PyTorch converts both operands to float32 at every call (105 ms for
Qwen's 151,936 x 512 table on the 2-core benchmark machine). Here the
table is laid out by vocabulary rows, (vocabulary, hidden), and

- PyTorch multiplies with `torch._int_mm` (int8 x int8 into int32, exact),
  and one row under `torch.compile` as a multiply and a sum that Inductor
  runs as one loop over the int8 table (integers in float32, exact as
  below);
- JAX and TensorFlow convert one block of rows at a time to float32 and
  multiply it, inside a loop, so that a step reads the int8 table once
  and each block's float32 copy stays in cache; the products are exact
  integers while hidden x 127 x 127 < 2 ** 24 (hidden <= 1,040), and
  within float32 rounding beyond.

Off CPU, the product is Keras' `ops.matmul`.

bfloat16 (`bfloat16_product`), JAX on CPU, in generation. XLA's CPU
products take a bfloat16 table against one row of activations by
widening the whole table to float32 first, and inside `generate`'s loop
that widening is hoisted out of the loop: every step reads a float32
copy, as many bytes as a float32 model's. Here the table's bits are read
as 16-bit integers (which XLA cannot widen as floats), and each block of
vocabulary rows is widened in cache by a shift of those bits, exact: a
step reads the 16-bit table once, half float32's bytes (the "small"
benchmark's lm_head: 4.8 against 9.6 ms a step on F). The bits have no
gradient with respect to the table, so only calls that need none (the
cached passes of generation) take this path.

int8 projections (`int8_projection`), PyTorch and JAX on CPU, in
decoding steps. Keras' int8 Dense and EinsumDense layers multiply int8 by
int8 with `ops.einsum` or `ops.matmul`. PyTorch on CPU runs that by
converting both operands to wider types at every call, inside a
custom-gradient wrapper; and under `torch.compile` their abs-max quantizer
(`ops.max`) and scale layouts (tracked lists of axes) break the graph: the
"small" benchmark's decoding step became 66 graphs, slower compiled than
eager. XLA (JAX) converts each int8 kernel to int32 once, out of
`generate`'s loop, and every step reads those 32-bit copies, as many bytes
as a float32 model's blocks. Here the same computation: the activations
quantized per row as Keras' `AbsMaxQuantizer` does (`quantize_rows`), the
integer product, then the layer's scales, bias and activation. The product
is `torch._int_mm` on PyTorch (int8 x int8 into int32, exact), written for
Dynamo (one graph). On JAX, for one row (batch-1 decoding; with more rows
XLA's product of the int32 copies is the faster, `INT8_MAX_ROWS`), the
int8 kernel is widened to float32 inside each step, made to depend on the
step's activations so that XLA cannot hoist it: a step reads the kernels'
8 bits (exact integers while inputs x 127 x 127 < 2 ** 24, within float32
rounding beyond). The same values as the layer's own call; no gradient
(the cached passes of generation only).

bfloat16 projections (`bfloat16_projection`), JAX on CPU, in decoding
steps. The decoder blocks' bfloat16 kernels met the same widening out of
the loop. Their bits are widened inside each step instead, made to depend
on the step's activations so that XLA cannot hoist the widening: each
kernel is read at 16 bits and its float32 copy, a few MB, stays in cache.
"""

import math

import keras
from keras import ops

from keras_qwenvl.ordering import after

# Bytes of one block's float32 copy (JAX, TensorFlow): small enough to
# stay in a core's cache between its conversion and its product.
BLOCK_BYTES = 1 << 22


def _on_cpu(table):
    backend = keras.config.backend()
    if backend == "torch":
        return table.device.type == "cpu"
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return False


def product(inputs, table):
    """`inputs @ table.T` for int8 inputs (..., hidden) and an int8 table
    (vocabulary, hidden): int32 (PyTorch and off CPU) or float32 holding
    the integer products.

    On PyTorch, one row under `torch.compile` is a multiply and a sum
    over the hidden axis, which Inductor runs as one loop reading the
    int8 table (the "small" benchmark's lm_head: 3.3 against 8.2 ms a
    step with `torch._int_mm`, F), provided the row is computed before
    that loop, not inside it for every vocabulary row
    (`torch_decoding.INT8_INDUCTOR_OPTIONS`)."""
    if not _on_cpu(table):
        return ops.matmul(inputs, ops.transpose(table))
    if keras.config.backend() == "torch":
        import torch

        rows = inputs.reshape(-1, inputs.shape[-1])
        if rows.shape[0] == 1 and torch.compiler.is_compiling():
            out = (rows.float()[:, None, :] * table.float()).sum(-1)
        else:
            out = int_mm(rows, table.t())
        return out.reshape(*inputs.shape[:-1], table.shape[0])
    return _blocked_product(inputs, table)


def int_mm(a, b):
    """`torch._int_mm(a, b)`: int8 (m, k) by int8 (k, n) into int32.

    One row is multiplied as two: under `torch.compile`, Inductor hands a
    one-row operand made inside the graph to ATen with a stride of 0 for
    its rows, and ATen's CPU kernel then reads it wrongly (torch 2.13:
    garbage logits, `tests/test_narrow_products.py`)."""
    import torch

    if a.shape[0] != 1:
        return torch._int_mm(a, b)
    return torch._int_mm(torch.cat([a, a]), b)[:1]


def block_rows(vocabulary, hidden):
    """Rows of the table per block: the largest divisor of the vocabulary
    whose float32 copy fits `BLOCK_BYTES`, so that all blocks are one
    loop's (Qwen's 151,936 = 128 x 1,187: blocks of 1,187 rows at hidden
    512); a vocabulary without such a divisor of at least a quarter of
    that size is cut into blocks of that size and a remainder, multiplied
    after the loop."""
    most = max(1, min(vocabulary, BLOCK_BYTES // (4 * hidden)))
    for rows in range(most, most // 4, -1):
        if vocabulary % rows == 0:
            return rows
    return most


def _to_float32(block):
    return ops.cast(block, "float32")


def _blocked_product(inputs, table, widen=_to_float32):
    """`inputs @ widen(table).T`, `widen` applied a block of rows at a
    time inside a loop."""
    vocabulary, hidden = table.shape
    lead = ops.shape(inputs)[:-1]
    rows = ops.cast(ops.reshape(inputs, (-1, hidden)), "float32")
    block = block_rows(vocabulary, hidden)
    blocks = vocabulary // block

    def one_block(rows_of_table):
        return ops.matmul(rows, ops.transpose(widen(rows_of_table)))

    def block_at(index):
        start = ops.multiply(index, block)
        return one_block(ops.slice(table, (start, 0), (block, hidden)))

    # A loop over block indices: the table is sliced inside it, never
    # split into a stacked copy (TensorFlow's `map_fn` over the table
    # itself copied all of it at every step).
    out = ops.map(block_at, ops.arange(blocks, dtype="int32"))
    out = ops.reshape(ops.transpose(out, (1, 0, 2)), (-1, blocks * block))
    if blocks * block < vocabulary:
        out = ops.concatenate([out, one_block(table[blocks * block :])], -1)
    return ops.reshape(out, (*lead, vocabulary))


# Rows of activations (batch x positions) up to which `bfloat16_product`
# and `bfloat16_projection` are taken. They widen their weights at every
# call, a cost that more rows do not share: at the "small" benchmark's
# sizes on F the decoding step with the lm_head's path was 1.4x faster
# than XLA's at batch 1, 1.2x at 2 and as fast at 4 and 8. On a 2-core
# Intel Xeon (README, "An Intel Xeon with AMX") it was 0.8x as fast at
# batch 1: XLA's loop of widening and product runs there at about 10 G
# weights a second, and one core streams half the memory bandwidth.
# Setting 0 before generating turns the bfloat16 paths off.
BFLOAT16_MAX_ROWS = 8

# The same for `int8_projection` on JAX: at the "small" benchmark's sizes
# on F, int8 decoding with it took 140 against 103 tokens/s with Keras'
# layers at batch 1 (medians of five, alternated in one process), but
# 0.9-0.96x of their speed at batch 2, 4 and 8, where XLA's product of
# int32 copies of the kernels is faster than a float32 product after the
# widening (which writes each kernel's float32 copy to the cache, about
# 70 of 90 microseconds for a 512 x 1,536 kernel).
INT8_MAX_ROWS = 1


def _rows(inputs, reduced=1):
    """How many rows of their `reduced` trailing axes `inputs` hold."""
    return math.prod(inputs.shape[: len(inputs.shape) - reduced])


def bfloat16_applies(inputs, kernel):
    """Whether `bfloat16_product` computes `inputs @ kernel` here: JAX on
    CPU, a bfloat16 kernel, at most `BFLOAT16_MAX_ROWS` rows."""
    if keras.config.backend() != "jax":
        return False
    if keras.backend.standardize_dtype(kernel.dtype) != "bfloat16":
        return False
    return _rows(inputs) <= BFLOAT16_MAX_ROWS and _on_cpu(kernel)


def bfloat16_product(inputs, kernel):
    """`inputs @ kernel` for a bfloat16 kernel (hidden, vocabulary), in
    float32 from the exactly widened kernel (JAX; see the module's
    docstring). No gradient with respect to `kernel`."""
    from jax import lax
    import jax.numpy as jnp

    bits = lax.bitcast_convert_type(ops.transpose(kernel), jnp.uint16)
    return _blocked_product(inputs, bits, widen=_bfloat16_bits_to_float32)


def _bfloat16_bits_to_float32(bits):
    """bfloat16 values from their 16 bits: the upper half of float32's."""
    from jax import lax
    import jax.numpy as jnp

    wide = lax.shift_left(bits.astype(jnp.uint32), jnp.uint32(16))
    return lax.bitcast_convert_type(wide, jnp.float32)


def bfloat16_projection_applies(layer, inputs):
    """Whether `bfloat16_projection(layer, inputs)` stands in for
    `layer(inputs)`: JAX on CPU, a plain (not quantized, no LoRA) Dense or
    EinsumDense layer with a bfloat16 kernel, at most `BFLOAT16_MAX_ROWS`
    rows of inputs."""
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        return False
    if layer.quantization_mode is not None or getattr(
        layer, "lora_enabled", False
    ):
        return False
    return bfloat16_applies(inputs, layer.kernel)


def bfloat16_projection(layer, inputs):
    """`layer(inputs)` for a Dense or EinsumDense layer whose bfloat16
    kernel is read as 16 bits and widened inside the call (JAX; see the
    module's docstring). Rounded as the layer rounds: the product to
    bfloat16, then the bias added. No gradient with respect to the
    kernel."""
    import jax.numpy as jnp
    from jax import lax

    bits = lax.bitcast_convert_type(ops.convert_to_tensor(layer.kernel),
                                    jnp.uint16)
    # Widened after this call's inputs exist: not out of the loop.
    bits = after(bits, inputs)
    kernel = _bfloat16_bits_to_float32(bits)
    inputs = ops.cast(inputs, "float32")
    if isinstance(layer, keras.layers.EinsumDense):
        outputs = ops.einsum(layer.equation, inputs, kernel)
    else:
        outputs = ops.matmul(inputs, kernel)
    outputs = ops.cast(outputs, layer.compute_dtype)
    if layer.bias is not None:
        outputs = ops.add(outputs, layer.bias)
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


def default_int8_quantizer(layer):
    """Whether `layer` quantizes its activations as `quantize("int8")` sets
    it up: an `AbsMaxQuantizer` to int8 (`quantize_rows` computes it)."""
    from keras.quantizers import AbsMaxQuantizer

    quantizer = getattr(layer, "inputs_quantizer", None)
    return (
        type(quantizer) is AbsMaxQuantizer
        and keras.backend.standardize_dtype(quantizer.output_dtype) == "int8"
        and quantizer.axis in (None, (-1,))
    )


def reduced_axes(layer):
    """How many trailing axes of `layer`'s inputs its product reduces, or
    None where they are not also the kernel's leading axes with the
    output the inputs' other axes then the kernel's (Dense: 1)."""
    if isinstance(layer, keras.layers.Dense):
        return 1
    if "." in layer.equation:
        return None
    operands, output = layer.equation.split("->")
    inputs, kernel = operands.split(",")
    reduced = "".join(axis for axis in inputs if axis not in output)
    count = len(reduced)
    if (
        not count
        or not inputs.endswith(reduced)
        or not kernel.startswith(reduced)
        or output != inputs[: len(inputs) - count] + kernel[count:]
    ):
        return None
    return count


def int8_projection_applies(layer, inputs):
    """Whether `int8_projection(layer, inputs)` stands in for
    `layer(inputs)`: PyTorch on CPU, or JAX on CPU with at most
    `INT8_MAX_ROWS` rows of inputs; a Dense or EinsumDense layer
    quantized by `quantize("int8")` (no LoRA), with its reduced axes last
    in the inputs and first in the kernel."""
    backend = keras.config.backend()
    if backend not in ("torch", "jax"):
        return False
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        return False
    if layer.quantization_mode != "int8" or getattr(
        layer, "lora_enabled", False
    ):
        return False
    if not default_int8_quantizer(layer):
        return False
    count = reduced_axes(layer)
    if count is None or not _on_cpu(inputs):
        return False
    return backend == "torch" or _rows(inputs, count) <= INT8_MAX_ROWS


def quantize_rows(quantizer, rows):
    """`quantizer(rows, axis=-1)` for an `AbsMaxQuantizer`, in operations
    that `torch.compile` traces into one graph (Keras' `ops.max` on
    PyTorch breaks it)."""
    low, high = quantizer.value_range
    largest = ops.amax(ops.abs(rows), axis=-1, keepdims=True)
    scale = ops.divide(high, ops.add(largest, quantizer.epsilon))
    scale = ops.cast(scale, rows.dtype)
    quantized = ops.clip(ops.round(ops.multiply(rows, scale)), low, high)
    return ops.cast(quantized, quantizer.output_dtype), scale


def int8_projection(layer, inputs):
    """`layer(inputs)` for an int8 Dense or EinsumDense layer on PyTorch's
    or JAX's CPU: the activations quantized per row, their integer product
    with the kernel, the layer's scales (see the module's docstring). No
    gradient."""
    count = reduced_axes(layer)
    kernel = layer._kernel.value
    width = math.prod(kernel.shape[:count])
    outputs = math.prod(kernel.shape[count:])
    kernel = ops.reshape(kernel, (width, outputs))
    rows = ops.reshape(inputs, (-1, width))
    quantized, rows_scale = quantize_rows(layer.inputs_quantizer, rows)
    if keras.config.backend() == "torch":
        x = int_mm(quantized, kernel)
    else:
        # Widened after this call's inputs exist: not out of the loop.
        wide = ops.cast(after(kernel, inputs), "float32")
        x = ops.matmul(ops.cast(quantized, "float32"), wide)
    x = ops.cast(x, layer.compute_dtype)
    scale = ops.reshape(layer.kernel_scale.value, (1, outputs))
    x = ops.divide(x, ops.multiply(rows_scale, scale))
    return layer_outputs(layer, x, inputs, count)


def layer_outputs(layer, product, inputs, count):
    """`product`, the (rows, outputs) product of the rows of `inputs`'
    `count` trailing axes by `layer`'s kernel seen as a matrix, as
    `layer(inputs)` returns it: in the layer's output shape, its bias
    added, its activation applied."""
    lead = tuple(inputs.shape[: len(inputs.shape) - count])
    x = ops.reshape(product, (*lead, *layer._kernel.shape[count:]))
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x
