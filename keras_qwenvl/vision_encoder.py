"""The vision encoder: ViT-bigG/14 followed by the position-aware adapter.

pixels (n, S, S, 3) -> patch conv (no bias) -> + learned 16x16 position table
resized to the patch grid -> ln_pre -> pre-norm blocks -> adapter -> ln_post
-> @ proj -> (n, num_queries, output_dim).
"""


import keras
import numpy as np
from keras import ops
from keras_hub.src.utils.keras_utils import clone_initializer

from keras_qwenvl.activations import exact_gelu
from keras_qwenvl.adapter import QwenVLAdapter
from keras_qwenvl.adapter import QwenVLMultiHeadAttention
from keras_qwenvl.initializers import projection_initializer
from keras_qwenvl.layer_norm import QwenVLLayerNorm
from keras_qwenvl.position_tables import resize_position_table
from keras_qwenvl.position_tables import sincos_2d_table
from keras_qwenvl.remat import rematerialized_call

# The checkpoint's learned ViT position table is always 16 x 16
# (`visual.positional_embedding` has 256 rows).
POSITION_TABLE_GRID = 16


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLVisionBlock(keras.layers.Layer):
    """Pre-LayerNorm ViT block: `x + attn(ln_1 x)`, `x + mlp(ln_2 x)`, with
    an exact (erf) GELU MLP. With `remat`, a training call keeps no
    activations: the backward pass recomputes them."""

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        layer_norm_epsilon=1e-6,
        kernel_initializer="glorot_uniform",
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.remat = bool(remat)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        width = input_shape[-1]
        policy = self.dtype_policy
        self.ln_1 = QwenVLLayerNorm(
            epsilon=self.layer_norm_epsilon, name="ln_1", dtype=policy
        )
        self.ln_1.build(input_shape)
        self.attention = QwenVLMultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=width // self.num_heads,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="attention",
            dtype=policy,
        )
        self.attention.build(input_shape)
        self.ln_2 = QwenVLLayerNorm(
            epsilon=self.layer_norm_epsilon, name="ln_2", dtype=policy
        )
        self.ln_2.build(input_shape)
        self.mlp_fc = keras.layers.Dense(
            self.intermediate_dim,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="mlp_fc",
            dtype=policy,
        )
        self.mlp_fc.build(input_shape)
        self.mlp_proj = keras.layers.Dense(
            width,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="mlp_proj",
            dtype=policy,
        )
        self.mlp_proj.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, x, attention_mask=None, training=None):
        def forward(x):
            x = x + self.attention(
                self.ln_1(x), attention_mask=attention_mask, training=training
            )
            h = exact_gelu(self.mlp_fc(self.ln_2(x)))
            return x + self.mlp_proj(h)

        if self.remat and training:
            return rematerialized_call(self, forward, x)
        return forward(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "remat": self.remat,
            }
        )
        return config


def window_attention_mask(grid, window_size):
    """(grid*grid, grid*grid) bool mask: patches attend inside their
    non-overlapping window_size x window_size window only."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    windows_per_row = -(-grid // window_size)
    ids = (rows // window_size) * windows_per_row + cols // window_size
    ids = ids.reshape(-1)
    return ids[:, None] == ids[None, :]


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLVisionEncoder(keras.layers.Layer):
    """ViT-bigG/14 plus the position-aware adapter of Qwen-VL.

    Called on preprocessed pixels (n, image_size, image_size, 3) it returns
    (n, num_queries, output_dim) image features for the decoder.

    Args:
        image_size: input resolution (config `visual.image_size`: 448;
            stage-1 pre-training used 224).
        patch_size: patch side (config `visual.patch_size`: 14).
        width: ViT width (config `visual.width`: 1664).
        num_layers: ViT depth (config `visual.layers`: 48).
        num_heads: ViT heads (config `visual.heads`: 16).
        intermediate_dim: ViT MLP width, `int(width * visual.mlp_ratio)`
            (8192 in the published model).
        output_dim: adapter and output width (config `visual.output_dim`:
            4096, the decoder's hidden size).
        num_queries: adapter queries (config `visual.n_queries`: 256).
        adapter_head_dim: per-head width of the adapter's cross-attention
            (128 in the published model: heads = output_dim // 128).
        layer_norm_epsilon: all LayerNorms (1e-6).
        window_size: None for global attention (the published model), or a
            window side in patches for the paper's window-attention
            ablation (Table 10); then the layers in
            `global_attention_layers` stay global.
        global_attention_layers: indices of layers kept global when
            `window_size` is set; defaults to the last layer of each quarter.
        spatial_start: False (the published model's initialisation), or
            True for training from scratch: the ViT's position table starts
            as a 2D sin-cos table (rather than small random values, so that
            every patch token knows its place from the first step) and the
            adapter's key projection as twice its query projection (each
            query starts with a bias towards the patches near its own
            place; `QwenVLAdapter`'s `local_start`). Weights loaded from a
            checkpoint replace both.
        remat: rematerialise each ViT block in training (its activations
            are recomputed in the backward pass instead of kept: at 448
            pixels a block keeps its 1,024 patches' activations and one
            (heads, 1,024, 1,024) attention array per image otherwise).
            Settable later: `backbone.vision_encoder.remat = True`.
    """

    def __init__(
        self,
        image_size=448,
        patch_size=14,
        width=1664,
        num_layers=48,
        num_heads=16,
        intermediate_dim=8192,
        output_dim=4096,
        num_queries=256,
        adapter_head_dim=128,
        layer_norm_epsilon=1e-6,
        window_size=None,
        global_attention_layers=None,
        spatial_start=False,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if spatial_start and width % 4:
            raise ValueError(
                f"`spatial_start` needs a `width` divisible by 4 (a 2D "
                f"sin-cos table). Received: width={width}"
            )
        if image_size % patch_size:
            raise ValueError(
                f"`image_size` ({image_size}) must be a multiple of "
                f"`patch_size` ({patch_size})."
            )
        if window_size is not None and global_attention_layers is None:
            global_attention_layers = [
                (q + 1) * num_layers // 4 - 1 for q in range(4)
            ]
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.output_dim = output_dim
        self.num_queries = num_queries
        self.adapter_head_dim = adapter_head_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.window_size = window_size
        self.global_attention_layers = (
            None
            if global_attention_layers is None
            else [int(i) for i in global_attention_layers]
        )
        self.spatial_start = bool(spatial_start)
        self.grid_size = image_size // patch_size

        # === Layers ===
        policy = self.dtype_policy
        self.patch_embedding = keras.layers.Conv2D(
            width,
            kernel_size=patch_size,
            strides=patch_size,
            use_bias=False,
            data_format="channels_last",
            # Each patch is one input vector of patch*patch*3 values: draw
            # the kernel as that matrix (Keras' convolution fans would count
            # the patch area in fan_out and start it ~patch_size times too
            # small, so that Adam's first steps scramble it).
            kernel_initializer=projection_initializer(
                "glorot_uniform", patch_size * patch_size * 3, width
            ),
            name="patch_embedding",
            dtype=policy,
        )
        self.ln_pre = QwenVLLayerNorm(
            epsilon=layer_norm_epsilon, name="ln_pre", dtype=policy
        )
        self.vision_layers = [
            QwenVLVisionBlock(
                num_heads=num_heads,
                intermediate_dim=intermediate_dim,
                layer_norm_epsilon=layer_norm_epsilon,
                name=f"vision_layer_{i}",
                dtype=policy,
            )
            for i in range(num_layers)
        ]
        self.remat = remat  # sets every block's `remat`
        self.adapter = QwenVLAdapter(
            output_dim=output_dim,
            num_queries=num_queries,
            head_dim=adapter_head_dim,
            layer_norm_epsilon=layer_norm_epsilon,
            local_start=2.0 if spatial_start else None,
            name="adapter",
            dtype=policy,
        )
        self.ln_post = QwenVLLayerNorm(
            epsilon=layer_norm_epsilon, name="ln_post", dtype=policy
        )
        self.proj = keras.layers.Dense(
            output_dim, use_bias=False, name="proj", dtype=policy
        )
        # The input shape is fixed by the config, so build right away: the
        # weights exist as soon as the encoder does.
        self.build()

    def build(self, input_shape=None):
        size = self.image_size
        self.patch_embedding.build((None, size, size, 3))
        if self.spatial_start:
            table = sincos_2d_table(self.width, POSITION_TABLE_GRID)

            def initializer(shape, dtype=None):
                return ops.cast(table, dtype)

        else:
            initializer = keras.initializers.RandomNormal(stddev=0.02)
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(POSITION_TABLE_GRID**2, self.width),
            initializer=initializer,
        )
        tokens = (None, self.grid_size**2, self.width)
        self.ln_pre.build(tokens)
        for layer in self.vision_layers:
            layer.build(tokens)
        self.adapter.build(tokens)
        features = (None, self.num_queries, self.output_dim)
        self.ln_post.build(features)
        self.proj.build(features)
        self.built = True

    @property
    def remat(self):
        """Whether the ViT blocks are rematerialised in training; settable
        on a built encoder (e.g. `backbone.vision_encoder.remat = True`
        after `from_preset`)."""
        return self._remat

    @remat.setter
    def remat(self, value):
        self._remat = bool(value)
        for layer in self.vision_layers:
            layer.remat = self._remat

    def call(self, pixels, training=None):
        """(n, S, S, 3) -> (n, num_queries, output_dim); a batch of image
        slots (b, m, S, S, 3) gives (b, m, num_queries, output_dim).
        `training` turns the blocks' `remat` on."""
        if len(pixels.shape) == 5:
            batch, slots = ops.shape(pixels)[0], ops.shape(pixels)[1]
            if pixels.shape[1] == 0:
                # No image slots (a text-only batch): nothing to encode, and
                # some kernels (int8 quantized projections) refuse empty
                # inputs.
                return ops.zeros(
                    (batch, 0, self.num_queries, self.output_dim),
                    dtype=self.compute_dtype,
                )
            flat = ops.reshape(pixels, (-1,) + tuple(pixels.shape[2:]))
            features = self.call(flat, training=training)
            return ops.reshape(
                features,
                (batch, slots, self.num_queries, self.output_dim),
            )
        x = self.adapter(
            self.patch_features(pixels, training=training), training=training
        )
        return self.proj(self.ln_post(x))

    def patch_features(self, pixels, training=None):
        """The ViT's output before the adapter: (n, S, S, 3) ->
        (n, grid * grid, width)."""
        x = self.patch_embedding(ops.cast(pixels, self.compute_dtype))
        x = ops.reshape(x, (-1, self.grid_size**2, self.width))
        positions = resize_position_table(self.position_embedding, self.grid_size)
        x = self.ln_pre(x + ops.cast(positions, x.dtype)[None])
        window_mask = None
        if self.window_size is not None:
            window_mask = ops.convert_to_tensor(
                window_attention_mask(self.grid_size, self.window_size)
            )
        for i, layer in enumerate(self.vision_layers):
            windowed = (
                window_mask is not None
                and i not in self.global_attention_layers
            )
            x = layer(
                x,
                attention_mask=window_mask if windowed else None,
                training=training,
            )
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-3]) + (self.num_queries, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.width,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "output_dim": self.output_dim,
                "num_queries": self.num_queries,
                "adapter_head_dim": self.adapter_head_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "window_size": self.window_size,
                "global_attention_layers": self.global_attention_layers,
                "spatial_start": self.spatial_start,
                "remat": self.remat,
            }
        )
        return config
