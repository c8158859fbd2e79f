"""The token embedding and untied lm_head of the decoder."""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding

from keras_qwenvl import narrow_products
from keras_qwenvl.ordering import after

if keras.config.backend() == "torch":
    from keras_qwenvl import torch_cpu_logits
else:
    torch_cpu_logits = None


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLTokenEmbedding(ReversibleEmbedding):
    """keras-hub's `ReversibleEmbedding` (same weights, same numbers) whose
    lookup, on JAX, builds its table gradient only once the gradient of the
    looked-up rows exists, and whose lm_head, on PyTorch on CPU, runs
    through oneDNN where no gradient is needed.

    The gradient of a lookup is a table-sized array of zeros into which the
    rows' gradients are added. Nothing in it depends on the forward or
    backward pass, and XLA's CPU scheduler creates the zeros early, so that
    a training step holds them next to all its activations (311 MB at
    Qwen's 151,936 x 512, 2.5 GB at the published 4,096): here the zeros
    are made to depend on the rows' gradient (`ordering.after`), which
    places them after it. Other backends (and quantized or reverse calls)
    use the parent's lookup unchanged.

    On PyTorch on CPU, the lm_head (`reverse=True`) of float32 calls that
    need no gradient multiplies through oneDNN rather than MKL (see
    `torch_cpu_logits`: its product 2.7x faster in a batch-8 decoding
    step); other reverse calls are the parent's.

    Quantized to int8 (`quantize("int8")`, the parent's quantization), the
    untied lm_head's table is kept by vocabulary rows, (vocabulary,
    hidden), as the embedding's is, rather than the parent's (hidden,
    vocabulary), and the lm_head's int8 product is
    `narrow_products.product`: the same logits, several times faster on
    CPU (see there).

    A bfloat16 table on JAX is looked up as 16-bit integers (the same
    rows; as floats, XLA widened the whole table before a decoding loop),
    and generation's logits (`decoding_logits`) read it at 16 bits on CPU
    (`narrow_products.bfloat16_product`).
    """

    # Set while the parent quantizes: its quantization fills the untied
    # table in its own layout, which `quantize` then lays out by rows.
    _parent_layout = False

    def call(self, inputs, reverse=False):
        if reverse and torch_cpu_logits is not None:
            kernel = self._plain_reverse_kernel()
            if kernel is not None and torch_cpu_logits.applies(
                inputs, kernel
            ):
                return torch_cpu_logits.matmul(inputs, kernel)
        if (
            reverse
            or self.quantization_mode is not None
            or keras.config.backend() != "jax"
        ):
            return super().call(inputs, reverse=reverse)
        if not str(inputs.dtype).startswith("int"):
            inputs = ops.cast(inputs, "int32")
        table = ops.convert_to_tensor(self.embeddings)
        return ops.cast(_jax_lookup(table, inputs), self.compute_dtype)

    def quantize(self, mode=None, type_check=True, config=None):
        self._parent_layout = True
        try:
            super().quantize(mode, type_check=type_check, config=config)
        finally:
            self._parent_layout = False
        if mode == "int8" and not self.tie_weights:
            by_rows = ops.transpose(self.reverse_embeddings)
            self._replace_reverse_table(by_rows)

    def _int8_build(self, embeddings_shape, config=None):
        super()._int8_build(embeddings_shape, config)
        if not self.tie_weights and not self._parent_layout:
            self._replace_reverse_table()

    def _replace_reverse_table(self, value=None):
        """The untied int8 table as (vocabulary, hidden)."""
        del self.reverse_embeddings
        self.reverse_embeddings = self.add_weight(
            name="reverse_embeddings",
            shape=(self.input_dim, self.output_dim),
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        if value is not None:
            self.reverse_embeddings.assign(value)

    def _int8_call(self, inputs, reverse=False):
        if not reverse:
            return super()._int8_call(inputs)
        if self.tie_weights:
            table, scale = self._embeddings, self.embeddings_scale
        else:
            table = self.reverse_embeddings
            scale = self.reverse_embeddings_scale
        table = ops.convert_to_tensor(table)
        if self.inputs_quantizer:
            if narrow_products.default_int8_quantizer(self):
                inputs, inputs_scale = narrow_products.quantize_rows(
                    self.inputs_quantizer, inputs
                )
            else:
                inputs, inputs_scale = self.inputs_quantizer(inputs)
            logits = narrow_products.product(inputs, table)
        else:
            inputs_scale = ops.ones((1,), dtype=self.compute_dtype)
            logits = ops.matmul(inputs, ops.transpose(table))
        logits = ops.cast(logits, self.compute_dtype)
        logits = ops.divide(logits, ops.multiply(inputs_scale, scale))
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def decoding_logits(self, hidden_states):
        """The lm_head's logits for a call that needs no gradient with
        respect to the table (the cached passes of generation).

        The same as `self(hidden_states, reverse=True)`; with a bfloat16
        table on JAX on CPU and a few rows of hidden states (a decoding
        step), through `narrow_products.bfloat16_product`, which reads the
        16-bit table where XLA's product would read a float32 copy.
        """
        kernel = self._plain_reverse_kernel()
        if kernel is not None and narrow_products.bfloat16_applies(
            hidden_states, kernel
        ):
            logits = narrow_products.bfloat16_product(hidden_states, kernel)
            return ops.cast(logits, self.compute_dtype)
        return self(hidden_states, reverse=True)

    def _plain_reverse_kernel(self):
        """The (hidden, vocabulary) kernel of a reverse call that is a
        plain product (not quantized, cast or soft-capped), else None."""
        if (
            self.quantization_mode is not None
            or getattr(self, "reverse_dtype", None) is not None
            or getattr(self, "logit_soft_cap", None) is not None
        ):
            return None
        if self.tie_weights:
            return ops.transpose(ops.convert_to_tensor(self.embeddings))
        return ops.convert_to_tensor(self.reverse_embeddings)


def _jax_lookup(table, ids):
    """`table[ids]`, with its table gradient made after the rows' one."""
    import jax
    import jax.numpy as jnp

    @jax.custom_gradient
    def lookup(table):
        def gradient(rows_gradient):
            rows_gradient = rows_gradient.reshape(-1, table.shape[-1])
            zeros = after(jnp.zeros(table.shape, table.dtype), rows_gradient)
            flat_ids = ids.reshape(-1)
            return (zeros.at[flat_ids].add(rows_gradient.astype(table.dtype)),)

        if table.dtype != jnp.bfloat16:
            return jnp.take(table, ids, axis=0), gradient
        # The rows of a bfloat16 table are gathered as 16-bit integers:
        # gathered as floats, XLA widened the whole table to float32
        # first, out of the decoding loop (a float32 copy per call).
        bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
        rows = jnp.take(bits, ids, axis=0)
        return jax.lax.bitcast_convert_type(rows, jnp.bfloat16), gradient

    return lookup(table)
