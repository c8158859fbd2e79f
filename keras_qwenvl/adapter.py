"""The position-aware vision-language adapter (paper, section 2.1).

One cross-attention layer compresses the ViT's patch features to a fixed
number of learned queries. A fixed 2D sin-cos table is added to the queries
(at its own 16x16 grid) and, resized to the patch grid, to the keys.
"""

import math

import keras
from keras import ops
from keras_hub.src.utils.keras_utils import clone_initializer

from keras_qwenvl.decoder import HEADS_TO_HIDDEN
from keras_qwenvl.initializers import projection_initializer
from keras_qwenvl.layer_norm import QwenVLLayerNorm
from keras_qwenvl.position_tables import resize_position_table
from keras_qwenvl.position_tables import sincos_2d_table
from keras_qwenvl.softmax import attention_weighted_sum


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLMultiHeadAttention(keras.layers.Layer):
    """Non-causal multi-head attention with `query`, `key`, `value` and
    `attention_output` projections (all with bias), inputs (b, t, d).

    Used by the adapter (separate query/key/value inputs) and by the ViT
    blocks (self-attention). `attention_mask` (t, s) is an optional bool
    mask shared by the batch. A query of batch size 1 with keys of batch
    size b is projected once and shared by the b rows (the adapter's
    learned queries are the same for every image).
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape=None, value_shape=None):
        key_shape = key_shape or query_shape
        value_shape = value_shape or key_shape
        hidden_dim = query_shape[-1]
        heads_width = self.num_heads * self.head_dim
        for name, shape in (
            ("query", query_shape),
            ("key", key_shape),
            ("value", value_shape),
        ):
            layer = keras.layers.EinsumDense(
                "btd,dnh->btnh",
                output_shape=(None, self.num_heads, self.head_dim),
                bias_axes="nh",
                kernel_initializer=projection_initializer(
                    self.kernel_initializer, shape[-1], heads_width
                ),
                name=name,
                dtype=self.dtype_policy,
            )
            layer.build(shape)
            setattr(self, name, layer)
        self.attention_output = keras.layers.EinsumDense(
            HEADS_TO_HIDDEN,
            output_shape=(None, hidden_dim),
            bias_axes="d",
            kernel_initializer=projection_initializer(
                self.kernel_initializer, heads_width, hidden_dim
            ),
            name="attention_output",
            dtype=self.dtype_policy,
        )
        self.attention_output.build((None, None, self.num_heads, self.head_dim))
        self.built = True

    def call(
        self, query, key=None, value=None, attention_mask=None, training=None
    ):
        key = query if key is None else key
        value = key if value is None else value
        q = self.query(query)
        k = self.key(key)
        v = self.value(value)
        # Heads first: (b, n, t, h), so that both products are batched
        # over leading dimensions; the scale goes on the smaller operand.
        q = ops.transpose(q, (0, 2, 1, 3))
        q = q * ops.cast(1.0 / math.sqrt(self.head_dim), q.dtype)
        if query.shape[0] == 1 and key.shape[0] != 1:
            q = ops.broadcast_to(q, (ops.shape(k)[0],) + tuple(q.shape[1:]))
        k = ops.transpose(k, (0, 2, 1, 3))
        v = ops.transpose(v, (0, 2, 1, 3))
        # Heads one at a time for large scores, outside training
        # (`attention_weighted_sum`).
        out = attention_weighted_sum(
            q, k, v, attention_mask, loop_heads=not training
        )
        return self.attention_output(ops.transpose(out, (0, 2, 1, 3)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLAdapter(keras.layers.Layer):
    """Cross-attention from `num_queries` learned queries to patch features.

    Called on (n, grid*grid, vision_width) patch features, returns
    (n, num_queries, output_dim). Heads are output_dim // 128 as in the
    published model (`attn_pool`).

    Args:
        output_dim: width of the queries and of the output (config
            `visual.output_dim`).
        num_queries: number of learned queries, a square (config
            `visual.n_queries`; the paper's ablation used 64, 144, 256, 400).
        head_dim: per-head width of the cross-attention (128 in the
            published model).
        local_start: None (the default), or a factor: the key projection
            then starts as `local_start` times the query projection, so
            that the fixed sin-cos positions on queries and keys meet in a
            positive product: each query of a model trained from scratch
            starts with a bias towards the patches near its own place
            (content terms still dominate single scores). Only the start
            differs; the weights stay separate and trainable.
    """

    def __init__(
        self,
        output_dim,
        num_queries=256,
        head_dim=128,
        layer_norm_epsilon=1e-6,
        kernel_initializer="glorot_uniform",
        local_start=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        grid = int(round(math.sqrt(num_queries)))
        if grid * grid != num_queries:
            raise ValueError(
                f"`num_queries` must be a square number, got {num_queries}."
            )
        if output_dim % head_dim:
            raise ValueError(
                f"`output_dim` ({output_dim}) must be a multiple of "
                f"`head_dim` ({head_dim})."
            )
        self.output_dim = output_dim
        self.num_queries = num_queries
        self.head_dim = head_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.local_start = None if local_start is None else float(local_start)
        self.query_grid = grid

    def build(self, input_shape):
        policy = self.dtype_policy
        self.query = self.add_weight(
            name="query",
            shape=(self.num_queries, self.output_dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )
        table = sincos_2d_table(self.output_dim, self.query_grid)
        self.pos_embed = self.add_weight(
            name="pos_embed",
            shape=table.shape,
            initializer=lambda shape, dtype=None: ops.cast(table, dtype),
            trainable=False,
        )
        self.kv_proj = keras.layers.Dense(
            self.output_dim,
            use_bias=False,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="kv_proj",
            dtype=policy,
        )
        self.kv_proj.build(input_shape)
        norm_shape = (None, None, self.output_dim)
        self.ln_q = QwenVLLayerNorm(
            epsilon=self.layer_norm_epsilon, name="ln_q", dtype=policy
        )
        self.ln_q.build(norm_shape)
        self.ln_kv = QwenVLLayerNorm(
            epsilon=self.layer_norm_epsilon, name="ln_kv", dtype=policy
        )
        self.ln_kv.build(norm_shape)
        self.attention = QwenVLMultiHeadAttention(
            num_heads=self.output_dim // self.head_dim,
            head_dim=self.head_dim,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="attention",
            dtype=policy,
        )
        self.attention.build(norm_shape, norm_shape, norm_shape)
        if self.local_start is not None:
            self.attention.key.kernel.assign(
                self.attention.query.kernel * self.local_start
            )
        self.built = True

    def call(self, patches, training=None):
        num_patches = patches.shape[1]
        patch_grid = int(round(math.sqrt(num_patches)))
        kv = self.ln_kv(self.kv_proj(patches))
        pos = ops.cast(self.pos_embed, kv.dtype)
        key_pos = resize_position_table(self.pos_embed, patch_grid)
        # One row of queries: projected once, shared by every image.
        queries = (self.ln_q(ops.cast(self.query, kv.dtype)) + pos)[None]
        return self.attention(
            queries,
            kv + ops.cast(key_pos, kv.dtype)[None],
            kv,
            training=training,
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_queries, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "output_dim": self.output_dim,
                "num_queries": self.num_queries,
                "head_dim": self.head_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "local_start": self.local_start,
            }
        )
        return config
