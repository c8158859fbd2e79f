"""The int8 lm_head's integer product, fast on CPU on every backend.

Keras' int8 lm_head multiplies int8 activations by the int8 table with
`ops.matmul`, which on CPU is the slowest product of a decoding step:
XLA (JAX, TensorFlow) multiplies int8 by int8 into int32 without vector
instructions, or hoists a float32 copy of the table out of the decoding
loop and reads that at every step, and PyTorch converts both operands to
float32 at every call (105 ms for Qwen's 151,936 x 512 table on the
2-core benchmark machine). Here the table is laid out by vocabulary rows,
(vocabulary, hidden), and

- PyTorch multiplies with `torch._int_mm` (int8 x int8 into int32, exact);
- JAX and TensorFlow convert one block of rows at a time to float32 and
  multiply it, inside a loop, so that a step reads the int8 table once
  and each block's float32 copy stays in cache; the products are exact
  integers while hidden x 127 x 127 < 2 ** 24 (hidden <= 1,040), and
  within float32 rounding beyond.

Off CPU, the product is Keras' `ops.matmul`.
"""

import keras
from keras import ops

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
    the integer products."""
    if not _on_cpu(table):
        return ops.matmul(inputs, ops.transpose(table))
    if keras.config.backend() == "torch":
        import torch

        rows = inputs.reshape(-1, inputs.shape[-1])
        out = torch._int_mm(rows, table.t())
        return out.reshape(*inputs.shape[:-1], table.shape[0])
    return _blocked_product(inputs, table)


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


def _blocked_product(inputs, table):
    vocabulary, hidden = table.shape
    lead = ops.shape(inputs)[:-1]
    rows = ops.cast(ops.reshape(inputs, (-1, hidden)), "float32")
    block = block_rows(vocabulary, hidden)
    blocks = vocabulary // block

    def one_block(rows_of_table):
        return ops.matmul(
            rows, ops.transpose(ops.cast(rows_of_table, "float32"))
        )

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
