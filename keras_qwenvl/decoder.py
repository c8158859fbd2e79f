"""The Qwen-7B decoder block: RMSNorm, attention (RoPE, dynamic NTK, log-n,
KV cache) and the gated MLP.

Numerics follow the published `modeling_qwen.py`: RMSNorm normalises in
float32, rotary angles and their cos/sin are float32, and the two inference
tricks (dynamic NTK rotary scaling, log-n query scaling) are off in training.
"""

import math

import keras
import numpy as np
from keras import ops
from keras_hub.src.utils.keras_utils import clone_initializer

from keras_qwenvl import narrow_products
from keras_qwenvl.initializers import projection_initializer
from keras_qwenvl.remat import rematerialized_call
from keras_qwenvl.softmax import attention_softmax

# Dynamic NTK can raise the rotary base for prompts up to
# seq_length * 2 ** (_MAX_NTK_DOUBLINGS - 1) tokens; longer prompts keep the
# largest factor.
_MAX_NTK_DOUBLINGS = 24


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLRMSNorm(keras.layers.Layer):
    """RMSNorm: `x * rsqrt(mean(x^2) + eps)` in float32, then `* scale`."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="ones"
        )
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        var = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = ops.cast(x32 * ops.rsqrt(var + self.epsilon), x.dtype)
        return normed * ops.cast(self.scale, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


# The output projection (b, t, heads, head_dim) x (heads, head_dim, hidden).
# JAX's einsum contracts the summed letters in alphabetical order: with
# heads before head_dim in the alphabet too ("h" < "k") the product reads
# both operands as they are laid out. Spelt "btnh,nhd->btd", XLA's CPU
# compiler copied the kernel transposed at every call (every decoding step).
HEADS_TO_HIDDEN = "bthk,hkd->btd"


def project(layer, x, cached):
    """`layer(x)` for a projection of a decoder block. In a cached pass
    (generation) of a few rows with bfloat16 kernels on JAX's CPU, through
    `narrow_products.bfloat16_projection`, which reads the kernel's 16 bits
    where XLA's product would read a float32 copy; with int8 kernels on
    PyTorch's CPU, through `narrow_products.int8_projection` (one graph
    under `torch.compile`, `torch._int_mm`), and on JAX's CPU for one
    row, where XLA's product would read an int32 copy; one row through
    an EinsumDense layer's float kernel on TensorFlow, through
    `two_row_projection`."""
    if cached and narrow_products.bfloat16_projection_applies(layer, x):
        return narrow_products.bfloat16_projection(layer, x)
    if cached and narrow_products.int8_projection_applies(layer, x):
        return narrow_products.int8_projection(layer, x)
    if cached and two_row_projection_applies(layer, x):
        return two_row_projection(layer, x)
    return layer(x)


def two_row_projection_applies(layer, x):
    """Whether `two_row_projection(layer, x)` stands in for `layer(x)`:
    TensorFlow, one row of inputs (batch-1 decoding), a float
    EinsumDense layer (not quantized, no LoRA) whose reduced axes are
    the inputs' last."""
    if keras.config.backend() != "tensorflow":
        return False
    if not isinstance(layer, keras.layers.EinsumDense):
        return False
    if layer.quantization_mode is not None or getattr(
        layer, "lora_enabled", False
    ):
        return False
    count = narrow_products.reduced_axes(layer)
    if count is None:
        return False
    lead = x.shape[: len(x.shape) - count]
    return None not in lead and math.prod(lead) == 1


def two_row_projection(layer, x):
    """`layer(x)` for one row of inputs as a matrix product of two rows,
    the row and zeros, the second dropped: the same values.

    XLA's CPU compiler (TensorFlow's) rewrites a product of one row by
    an EinsumDense kernel as an element-by-element loop that reads the
    kernel by columns: a product whose result has one axis and whose row
    is under 16 KB takes the kernel's reshape (a (1,024, 16, 64) query
    kernel seen as (1,024, 1,024)) into its fusion. At the benchmark's
    "base" size (hidden 1,024) each of a decoding step's 48 such
    products took about 4 ms against 0.6 as a library product, and
    batch-1 decoding ran 3.8 tokens/s against 17.8 on JAX. Two rows make
    the result a matrix, which XLA leaves to its product routine."""
    count = narrow_products.reduced_axes(layer)
    kernel = ops.cast(layer.kernel, layer.compute_dtype)
    width = math.prod(kernel.shape[:count])
    row = ops.reshape(ops.cast(x, layer.compute_dtype), (1, width))
    rows = ops.concatenate([row, ops.zeros_like(row)], axis=0)
    out = ops.matmul(rows, ops.reshape(kernel, (width, -1)))[:1]
    return narrow_products.layer_outputs(layer, out, x, count)


def ntk_alpha_index(lengths, seq_length):
    """Index k of the dynamic-NTK factor alpha = 2**k - 1 for prompt lengths.

    The reference computes `ceil(log2(length / seq_length) + 1)`; counting the
    doublings of `seq_length` below `length` gives the same integer without
    floating point at the power-of-two boundaries. Prompts up to `seq_length`
    get k = 1 (alpha 1: no scaling).

    `length > seq_length * 2**j` is tested as `(length - 1) // seq_length
    >= 2**j`, in int32 without overflow and without numpy constants (under
    `torch.compile` a numpy array converted at call time splits the graph).
    """
    lengths = ops.cast(lengths, "int32")
    whole = ops.floor_divide(lengths - 1, seq_length)
    # k = 1 + the doublings, at most the table's last row.
    powers = ops.power(2, ops.arange(_MAX_NTK_DOUBLINGS - 2, dtype="int32"))
    below = ops.cast(ops.expand_dims(whole, -1) >= powers, "int32")
    return ops.sum(below, axis=-1) + 1


def rotary_inverse_frequencies(rotary_dim, base):
    """(K, rotary_dim // 2) float32 table of inverse frequencies, row k for
    the NTK factor alpha = 2**k - 1 (row 0 equals row 1: alpha 1)."""
    exponents = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(
        rotary_dim
    )
    rows = []
    for k in range(_MAX_NTK_DOUBLINGS):
        alpha = max(2.0**k - 1.0, 1.0)
        scaled_base = base * alpha ** (rotary_dim / (rotary_dim - 2))
        rows.append(1.0 / np.power(np.float32(scaled_base), exponents))
    return np.stack(rows).astype(np.float32)


def attention_inputs(x, padding_mask, prompt_lengths, cache, start):
    """Rotary positions (b, t), prompt lengths (b,) and the (b, t, s) mask
    of a decoder call whose first query sits at index `start`.

    `padding_mask` may hold segment ids (0 = padding, 1..k = the k-th
    sample packed into the row): then a query attends only to earlier keys
    of its own segment and rotary positions restart at 0 in each segment,
    so a packed row computes what its samples compute alone. A 0/1 mask is
    the one-segment case.
    """
    batch, length = ops.shape(x)[0], ops.shape(x)[1]
    key_length = length if cache is None else ops.shape(cache[1])[1]
    index = ops.broadcast_to(
        start + ops.arange(length, dtype="int32")[None], (batch, length)
    )
    keys = ops.arange(key_length, dtype="int32")[None, None, :]
    mask = keys <= index[:, :, None]
    positions = index
    if padding_mask is not None:
        segments = ops.cast(padding_mask, "int32")
        key_segments = segments[:, None, :]
        mask = mask & (key_segments != 0)
        if cache is None:
            mask = mask & (segments[:, :, None] == key_segments)
            # Keys of the own segment up to the query, less one: the
            # position within the segment (the index for a single segment).
            positions = ops.sum(ops.cast(mask, "int32"), axis=-1) - 1
        if prompt_lengths is None:
            prompt_lengths = ops.sum(ops.cast(segments != 0, "int32"), axis=1)
    if prompt_lengths is None:
        prompt_lengths = ops.full((batch,), length, dtype="int32")
    return positions, prompt_lengths, mask


def empty_cache(batch, heads, head_dim, max_length, dtype):
    """A layer's zero (keys, values) in the layouts of `update_cache`."""
    rows = batch * heads
    return (
        ops.zeros((rows, head_dim, max_length), dtype),
        ops.zeros((rows, max_length, head_dim), dtype),
    )


def update_cache(cache, key, value, index, update_mask=None):
    """Write a call's keys and values, each (b, t, heads, head_dim), into a
    layer's cache at position `index`; where `update_mask` (b, t) is False
    the cache keeps its entries.

    The cache holds keys as (b * heads, head_dim, max_length) and values as
    (b * heads, max_length, head_dim): the attention's two products read
    them as they are, with one batch axis. Kept as (b, max_length, heads,
    head_dim), XLA's CPU compiler copied every layer's keys and values into
    those layouts at every decoding step (a sixth of a "small" batch-1
    step); kept 4-D with batch and heads apart, it updated each of them
    twice per step, once for the loop and once for the product, each
    update in a copy of its own.
    """
    batch, length, heads, head_dim = ops.shape(key)
    rows = batch * heads
    key = ops.reshape(
        ops.transpose(key, (0, 2, 3, 1)), (rows, head_dim, length)
    )
    value = ops.reshape(
        ops.transpose(value, (0, 2, 1, 3)), (rows, length, head_dim)
    )
    update = None
    if update_mask is not None:
        update = ops.reshape(
            ops.broadcast_to(update_mask[:, None, :], (batch, heads, length)),
            (rows, length),
        )
    if keras.config.backend() == "torch" and length == 1:
        # PyTorch's decoding step: a slice at a tensor position needs the
        # position as a Python int, which `torch.compile` cannot trace
        # without splitting the step; a mask over the cache's positions
        # can. Keras' PyTorch `slice_update` copies the whole cache anyway,
        # so eagerly this costs what the slice did.
        positions = ops.arange(ops.shape(cache[0])[-1], dtype="int32")
        chosen = (positions == ops.cast(index, "int32"))[None, :]
        if update is not None:
            chosen = ops.logical_and(chosen, update)
        return (
            ops.where(chosen[:, None, :], key, cache[0]),
            ops.where(chosen[:, :, None], value, cache[1]),
        )
    key_start, value_start = [0, 0, index], [0, index, 0]
    if update is not None:
        key = ops.where(
            update[:, None, :],
            key,
            ops.slice(cache[0], key_start, ops.shape(key)),
        )
        value = ops.where(
            update[:, :, None],
            value,
            ops.slice(cache[1], value_start, ops.shape(value)),
        )
    return (
        ops.slice_update(cache[0], key_start, key),
        ops.slice_update(cache[1], value_start, value),
    )


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLAttention(keras.layers.Layer):
    """Causal self-attention of the Qwen decoder with an optional KV cache.

    Projections are separate `query`, `key`, `value` (with bias, the split of
    the checkpoint's fused `c_attn`) and `attention_output` (no bias) so that
    LoRA, int8 quantisation and layout maps can find them by name.
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        rope_max_wavelength=10000,
        rotary_pct=1.0,
        seq_length=2048,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rope_max_wavelength = rope_max_wavelength
        self.rotary_pct = rotary_pct
        self.seq_length = seq_length
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        # config: rotary_pct (1.0 in the published model: all of head_dim).
        self.rotary_dim = int(head_dim * rotary_pct)
        self._inverse_frequencies = rotary_inverse_frequencies(
            self.rotary_dim, rope_max_wavelength
        )
        if keras.config.backend() == "torch":
            # A tensor once, not a numpy array at every call: converting one
            # inside `torch.compile` splits the compiled graph.
            self._inverse_frequencies = ops.convert_to_tensor(
                self._inverse_frequencies
            )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        heads_width = self.num_heads * self.head_dim
        for name in ("query", "key", "value"):
            layer = keras.layers.EinsumDense(
                "btd,dnh->btnh",
                output_shape=(None, self.num_heads, self.head_dim),
                bias_axes="nh",
                kernel_initializer=projection_initializer(
                    self.kernel_initializer, hidden_dim, heads_width
                ),
                name=name,
                dtype=self.dtype_policy,
            )
            layer.build(input_shape)
            setattr(self, name, layer)
        self.attention_output = keras.layers.EinsumDense(
            HEADS_TO_HIDDEN,
            output_shape=(None, hidden_dim),
            kernel_initializer=projection_initializer(
                self.kernel_initializer, heads_width, hidden_dim
            ),
            name="attention_output",
            dtype=self.dtype_policy,
        )
        self.attention_output.build(
            (None, None, self.num_heads, self.head_dim)
        )
        self.dropout_layer = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy
        )
        self.built = True

    def _rotate(self, x, positions, ntk_index):
        """Rotary embedding ("rotate half") at absolute `positions` (b, t)."""
        inv_freq = ops.take(
            ops.convert_to_tensor(self._inverse_frequencies), ntk_index, axis=0
        )  # (b, rotary_dim // 2)
        angles = ops.cast(positions, "float32")[:, :, None] * inv_freq[:, None]
        angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos, sin = ops.cos(angles), ops.sin(angles)
        x32 = ops.cast(x, "float32")
        rot, rest = x32[..., : self.rotary_dim], x32[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = ops.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        out = ops.concatenate([rot * cos + rotated * sin, rest], axis=-1)
        return ops.cast(out, x.dtype)

    def call(
        self,
        x,
        padding_mask=None,
        prompt_lengths=None,
        cache=None,
        cache_update_index=0,
        cache_update_mask=None,
        training=None,
    ):
        """Attend `x` (b, t, d) whose first token sits at `cache_update_index`.

        Args:
            padding_mask: (b, s) keys that are real tokens (all when None),
                or segment ids of packed samples (see `attention_inputs`).
            prompt_lengths: (b,) int, the prompt length per sample (by
                default the padding mask's count); it sets the dynamic-NTK
                factor at inference (the reference fixes it on the pass that
                has no cache and reuses it while decoding).
            cache: optional (key, value): keys (b * heads, head_dim, s),
                values (b * heads, s, head_dim) (see `update_cache`).
            cache_update_index: absolute position of `x[:, 0]`, where this
                call's keys go in the cache.
            cache_update_mask: optional (b, t) bool; where False the cache
                keeps its entry (prompt positions that decoding revisits).
        Returns:
            output, or (output, new_cache) when a cache is given.
        """
        positions, prompt_lengths, attention_mask = attention_inputs(
            x, padding_mask, prompt_lengths, cache, cache_update_index
        )
        if self.use_dynamic_ntk and not training:
            ntk_index = ntk_alpha_index(prompt_lengths, self.seq_length)
        else:
            ntk_index = ops.ones_like(ops.cast(prompt_lengths, "int32"))
        cached = cache is not None
        query = self._rotate(
            project(self.query, x, cached), positions, ntk_index
        )
        key = self._rotate(project(self.key, x, cached), positions, ntk_index)
        value = project(self.value, x, cached)
        if cache is not None:
            key, value = update_cache(
                cache, key, value, cache_update_index, cache_update_mask
            )
            cache = (key, value)
        if self.use_logn_attn and not training:
            # Query at 1-based position p is scaled by log_{seq_length}(p)
            # when p > seq_length (inference only).
            p = ops.cast(positions, "float32") + 1.0
            logn = ops.where(
                p > self.seq_length,
                ops.log(p) / math.log(self.seq_length),
                ops.ones_like(p),
            )
            query = query * ops.cast(logn[:, :, None, None], query.dtype)
        out = self._attend(query, key, value, attention_mask, training, cached)
        out = project(self.attention_output, out, cached)
        if cache is not None:
            return out, cache
        return out

    def _attend(self, query, key, value, mask, training, cached=False):
        """Attention of `query` (b, t, n, h) over keys and values that are
        (b, s, n, h), or in the cache's layouts when `cached`."""
        scale = 1.0 / math.sqrt(self.head_dim)
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        heads, head_dim = self.num_heads, self.head_dim
        if cached:
            query = ops.reshape(
                ops.transpose(query, (0, 2, 1, 3)),
                (batch * heads, length, head_dim),
            )
            scores = ops.matmul(query, key)
            scores = ops.reshape(scores, (batch, heads, length, -1))
        else:
            scores = ops.einsum("btnh,bsnh->bnts", query, key)
        scores = ops.cast(scores, "float32") * scale
        mask = mask[:, None, :, :]
        scores = ops.where(mask, scores, ops.full_like(scores, -1e30))
        probs = attention_softmax(scores)
        probs = ops.cast(probs, value.dtype)
        probs = self.dropout_layer(probs, training=training)
        if cached:
            probs = ops.reshape(probs, (batch * heads, length, -1))
            out = ops.reshape(
                ops.matmul(probs, value), (batch, heads, length, head_dim)
            )
            return ops.transpose(out, (0, 2, 1, 3))
        return ops.einsum("bnts,bsnh->btnh", probs, value)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rotary_pct": self.rotary_pct,
                "seq_length": self.seq_length,
                "use_dynamic_ntk": self.use_dynamic_ntk,
                "use_logn_attn": self.use_logn_attn,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLDecoderBlock(keras.layers.Layer):
    """Pre-RMSNorm block: `x + attn(ln_1 x)`, then `+ mlp(ln_2 x)` where the
    MLP is `out(up(x) * silu(gate(x)))` (up = checkpoint `w1`, gate = `w2`)."""

    def __init__(
        self,
        num_heads,
        head_dim,
        intermediate_dim,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000,
        rotary_pct=1.0,
        seq_length=2048,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        dropout=0.0,
        remat=False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.remat = remat
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.rotary_pct = rotary_pct
        self.seq_length = seq_length
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        policy = self.dtype_policy
        self.pre_attention_norm = QwenVLRMSNorm(
            self.layer_norm_epsilon, name="pre_attention_norm", dtype=policy
        )
        self.pre_attention_norm.build(input_shape)
        self.attention = QwenVLAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            rope_max_wavelength=self.rope_max_wavelength,
            rotary_pct=self.rotary_pct,
            seq_length=self.seq_length,
            use_dynamic_ntk=self.use_dynamic_ntk,
            use_logn_attn=self.use_logn_attn,
            dropout=self.dropout,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="attention",
            dtype=policy,
        )
        self.attention.build(input_shape)
        self.pre_mlp_norm = QwenVLRMSNorm(
            self.layer_norm_epsilon, name="pre_mlp_norm", dtype=policy
        )
        self.pre_mlp_norm.build(input_shape)

        def dense(units, name):
            return keras.layers.Dense(
                units,
                use_bias=False,
                kernel_initializer=clone_initializer(self.kernel_initializer),
                name=name,
                dtype=policy,
            )

        self.feedforward_intermediate_dense = dense(
            self.intermediate_dim, "feedforward_intermediate_dense"
        )
        self.feedforward_intermediate_dense.build(input_shape)
        self.feedforward_gate_dense = dense(
            self.intermediate_dim, "feedforward_gate_dense"
        )
        self.feedforward_gate_dense.build(input_shape)
        self.feedforward_output_dense = dense(
            hidden_dim, "feedforward_output_dense"
        )
        self.feedforward_output_dense.build(
            tuple(input_shape[:-1]) + (self.intermediate_dim,)
        )
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=policy)
        self.built = True

    def call(
        self,
        x,
        padding_mask=None,
        prompt_lengths=None,
        cache=None,
        cache_update_index=0,
        cache_update_mask=None,
        training=None,
    ):
        """See `QwenVLAttention.call` for the arguments. With `remat`, a
        training call keeps no activations: the backward pass recomputes
        them."""

        def forward(x):
            return self._forward(
                x,
                padding_mask,
                prompt_lengths,
                cache,
                cache_update_index,
                cache_update_mask,
                training,
            )

        if self.remat and training and cache is None:
            return rematerialized_call(self, forward, x)
        return forward(x)

    def _forward(
        self,
        x,
        padding_mask,
        prompt_lengths,
        cache,
        cache_update_index,
        cache_update_mask,
        training,
    ):
        attended = self.attention(
            self.pre_attention_norm(x),
            padding_mask=padding_mask,
            prompt_lengths=prompt_lengths,
            cache=cache,
            cache_update_index=cache_update_index,
            cache_update_mask=cache_update_mask,
            training=training,
        )
        if cache is not None:
            attended, cache = attended
        x = x + self.dropout_layer(attended, training=training)
        h = self.pre_mlp_norm(x)
        cached = cache is not None
        h = project(self.feedforward_intermediate_dense, h, cached) * ops.silu(
            project(self.feedforward_gate_dense, h, cached)
        )
        x = x + self.dropout_layer(
            project(self.feedforward_output_dense, h, cached),
            training=training,
        )
        if cache is not None:
            return x, cache
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "intermediate_dim": self.intermediate_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rotary_pct": self.rotary_pct,
                "seq_length": self.seq_length,
                "use_dynamic_ntk": self.use_dynamic_ntk,
                "use_logn_attn": self.use_logn_attn,
                "dropout": self.dropout,
                "remat": self.remat,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
