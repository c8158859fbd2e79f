"""QwenVLBackbone: token embeddings, image spans filled with image features,
Qwen-7B decoder blocks and the final RMSNorm."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import Backbone

from keras_qwenvl.decoder import QwenVLDecoderBlock
from keras_qwenvl.decoder import QwenVLRMSNorm
from keras_qwenvl.initializers import FreshDraws
from keras_qwenvl.presets import QwenVLPresetMixin
from keras_qwenvl.token_embedding import QwenVLTokenEmbedding
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder  # noqa: F401 (registers it for `from_config`)


def interleave_image_features(
    embeddings, token_ids, image_features, image_start_token_id
):
    """Put image features into the image spans of the token embeddings.

    The k-th `<img>` token of a sample opens its k-th image span: the
    `num_queries` positions after it take that sample's k-th image features,
    in order. Positions outside spans, and spans whose image slot does not
    exist, keep their token embeddings.

    Args:
        embeddings: (b, t, h) token embeddings.
        token_ids: (b, t) int token ids.
        image_features: (b, m, q, h) features of each sample's m image slots.
        image_start_token_id: id of `<img>`.
    """
    num_slots, num_queries = image_features.shape[1], image_features.shape[2]
    if num_slots is None:
        num_slots = ops.shape(image_features)[1]
    positions = ops.arange(ops.shape(token_ids)[1], dtype="int32")[None, :]
    is_start = ops.cast(ops.equal(token_ids, image_start_token_id), "int32")

    def starts_in_window(values):
        # Sum of `values` over starts at positions p - num_queries .. p - 1.
        total = ops.cumsum(values, axis=1)
        return _shift_right(total, 1) - _shift_right(total, num_queries + 1)

    # A position lies in a span when exactly one `<img>` precedes it within
    # `num_queries` tokens; that start's position and its index follow from
    # running sums, so no gather over a ragged list of spans is needed.
    count = starts_in_window(is_start)
    start = starts_in_window(is_start * positions)
    span = _shift_right(ops.cumsum(is_start, axis=1), 1) - 1
    offset = positions - start - 1
    inside = (count == 1) & (span < num_slots)
    # Row 0 of the flattened features is a zero row for positions outside
    # spans, which keeps the gather valid when there are no image slots.
    flat = ops.reshape(
        image_features, (ops.shape(image_features)[0], -1, image_features.shape[-1])
    )
    zero_row = ops.zeros((ops.shape(flat)[0], 1, flat.shape[-1]), flat.dtype)
    flat = ops.concatenate([zero_row, flat], axis=1)
    index = ops.where(inside, 1 + span * num_queries + offset, 0)
    gathered = ops.take_along_axis(flat, index[:, :, None], axis=1)
    return ops.where(
        inside[:, :, None], ops.cast(gathered, embeddings.dtype), embeddings
    )


def _shift_right(x, steps):
    """x[:, p - steps] at position p (zeros where p < steps)."""
    # Not `ops.pad`: under `torch.compile`, Keras' PyTorch `pad` left
    # Dynamo unable to trace the layer calls after it in the same graph.
    return ops.concatenate(
        [ops.zeros_like(x[:, :steps]), x[:, :-steps]], axis=1
    )


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLImageInterleave(keras.layers.Layer):
    """Weightless layer: `interleave_image_features` in a functional graph."""

    def __init__(self, image_start_token_id, **kwargs):
        super().__init__(**kwargs)
        self.image_start_token_id = image_start_token_id

    def call(self, embeddings, token_ids, image_features):
        return interleave_image_features(
            embeddings, token_ids, image_features, self.image_start_token_id
        )

    def compute_output_shape(self, embeddings_shape, *args):
        return embeddings_shape

    def get_config(self):
        config = super().get_config()
        config.update({"image_start_token_id": self.image_start_token_id})
        return config


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLBackbone(QwenVLPresetMixin, Backbone):
    """Qwen-VL: a ViT with the position-aware adapter feeding Qwen-7B.

    The functional model takes `token_ids` (b, t), `padding_mask` (b, t)
    and `images` (b, max_images, S, S, 3) and returns the decoder's hidden
    states after the final RMSNorm, (b, t, hidden_dim). The k-th `<img>`
    span of a sample takes that sample's k-th image; unused image slots are
    ignored; a batch of text-only samples may omit `images`.

    Args:
        vocabulary_size: rows of the embedding and of the (untied) lm_head
            (config `vocab_size`: 151936).
        num_layers: decoder blocks (config `num_hidden_layers`: 32).
        num_heads: attention heads (config `num_attention_heads`: 32).
        hidden_dim: model width (config `hidden_size`: 4096).
        intermediate_dim: width of each MLP matrix (config
            `intermediate_size // 2`: 11008).
        head_dim: per-head width (config `kv_channels`: 128); defaults to
            hidden_dim // num_heads.
        layer_norm_epsilon: RMSNorm epsilon (config `layer_norm_epsilon`).
        rope_max_wavelength: rotary base (config `rotary_emb_base`: 10000).
        rotary_pct: fraction of head_dim rotated (config `rotary_pct`: 1.0).
        seq_length: training context (config `seq_length`: 2048); dynamic
            NTK and log-n attention start beyond it at inference.
        use_dynamic_ntk: config `use_dynamic_ntk` (inference only).
        use_logn_attn: config `use_logn_attn` (inference only).
        image_start_token_id: id of `<img>` (config
            `visual.image_start_id`: 151857).
        vision_encoder: a `QwenVLVisionEncoder`, or None for a text-only
            model (then there is no `images` input).
        dropout: dropout of attention probabilities and residual branches
            (config `attn_dropout_prob`, 0.0).
        tie_word_embeddings: config `tie_word_embeddings` (False).
        remat: rematerialise each decoder block in training (its
            activations are recomputed in the backward pass instead of
            kept), which trades compute for memory on long sequences.
            On JAX `QwenVLCausalLM.compile(loss="auto")` then recomputes
            the lm_head's logits in the loss as well
            (`QwenVLCrossEntropy(remat=True)`).
        dtype: dtype policy of the model's computations and weights.
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        head_dim=None,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000,
        rotary_pct=1.0,
        seq_length=2048,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        image_start_token_id=151857,
        vision_encoder=None,
        dropout=0.0,
        tie_word_embeddings=False,
        remat=False,
        dtype=None,
        **kwargs,
    ):
        unknown = set(kwargs) - {"name", "trainable"}
        if unknown:
            raise TypeError(
                f"QwenVLBackbone got unexpected arguments: {sorted(unknown)}"
            )
        head_dim = head_dim or hidden_dim // num_heads
        if (
            vision_encoder is not None
            and vision_encoder.output_dim != hidden_dim
        ):
            raise ValueError(
                f"The vision encoder's `output_dim` "
                f"({vision_encoder.output_dim}) must equal `hidden_dim` "
                f"({hidden_dim})."
            )

        # === Layers ===
        self.token_embedding = QwenVLTokenEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=tie_word_embeddings,
            # The untied lm_head must not start as a copy of the embedding.
            embeddings_initializer=FreshDraws(
                keras.initializers.RandomNormal(stddev=0.02)
            ),
            dtype=dtype,
            name="token_embedding",
        )
        self.vision_encoder = vision_encoder
        self.image_interleave = QwenVLImageInterleave(
            image_start_token_id, dtype=dtype, name="image_interleave"
        )
        self.transformer_layers = [
            QwenVLDecoderBlock(
                num_heads=num_heads,
                head_dim=head_dim,
                intermediate_dim=intermediate_dim,
                layer_norm_epsilon=layer_norm_epsilon,
                rope_max_wavelength=rope_max_wavelength,
                rotary_pct=rotary_pct,
                seq_length=seq_length,
                use_dynamic_ntk=use_dynamic_ntk,
                use_logn_attn=use_logn_attn,
                dropout=dropout,
                remat=remat,
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_normalization = QwenVLRMSNorm(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_normalization"
        )

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(
            shape=(None,), dtype="int32", name="padding_mask"
        )
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        x = self.token_embedding(token_ids)
        if vision_encoder is not None:
            size = vision_encoder.image_size
            images = keras.Input(
                shape=(None, size, size, 3), dtype="float32", name="images"
            )
            inputs["images"] = images
            x = self.image_interleave(x, token_ids, vision_encoder(images))
        for layer in self.transformer_layers:
            x = layer(x, padding_mask=padding_mask)
        sequence_output = self.final_normalization(x)
        super().__init__(
            inputs=inputs, outputs=sequence_output, dtype=dtype, **kwargs
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.rotary_pct = rotary_pct
        self.seq_length = seq_length
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.image_start_token_id = image_start_token_id
        self.dropout = dropout
        self.tie_word_embeddings = tie_word_embeddings
        self.remat = remat

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self.fill_images(inputs), *args, **kwargs)

    def fill_images(self, inputs):
        """Give a text-only batch an empty `images` input (zero slots)."""
        if (
            self.vision_encoder is None
            or not isinstance(inputs, dict)
            or inputs.get("images") is not None
        ):
            return inputs
        size = self.vision_encoder.image_size
        token_ids = inputs["token_ids"]
        shape = (ops.shape(token_ids)[0], 0, size, size, 3)
        if isinstance(token_ids, np.ndarray):
            empty = np.zeros(shape, dtype="float32")
        else:
            empty = ops.zeros(shape, dtype="float32")
        return {**inputs, "images": empty}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "head_dim": self.head_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rotary_pct": self.rotary_pct,
                "seq_length": self.seq_length,
                "use_dynamic_ntk": self.use_dynamic_ntk,
                "use_logn_attn": self.use_logn_attn,
                "image_start_token_id": self.image_start_token_id,
                "vision_encoder": (
                    None
                    if self.vision_encoder is None
                    else keras.layers.serialize(self.vision_encoder)
                ),
                "dropout": self.dropout,
                "tie_word_embeddings": self.tie_word_embeddings,
                "remat": self.remat,
            }
        )
        return config

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A `keras.distribution.LayoutMap` sharding Qwen-VL's weights.

        Attention heads, MLP hidden units and the vocabulary of the vision
        encoder, the adapter and the decoder are split over
        `model_parallel_dim_name`; everything else is replicated. See
        `keras_qwenvl.distribution.get_layout_map`; use the map with
        `keras_qwenvl.distribution.QwenVLModelParallel`, or call
        `keras_qwenvl.distribution.model_parallel`, which also checks that
        the rules cover every weight.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: the mesh axis weights are split over.
            data_parallel_dim_name: the mesh axis batches are split over.

        Example:
        ```python
        mesh = keras.distribution.DeviceMesh(
            (2, 4), ("batch", "model"), keras.distribution.list_devices()
        )
        layout_map = QwenVLBackbone.get_layout_map(mesh)
        distribution = QwenVLModelParallel(layout_map=layout_map)
        with distribution.scope():
            model = QwenVLCausalLM.from_preset("/data/Qwen-VL")
        ```
        """
        # Imported here: the distribution module builds backbones.
        from keras_qwenvl.distribution import get_layout_map

        return get_layout_map(
            device_mesh, model_parallel_dim_name, data_parallel_dim_name
        )

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = config.get("vision_encoder")
        if isinstance(encoder, dict):
            dtype = config.get("dtype")
            if _is_policy_map(dtype):
                # A quantized model's map of layer paths to policies: the
                # encoder's layers find theirs in it (its own config
                # holds the policy it had before quantization).
                encoder = {**encoder, "config": {**encoder["config"]}}
                encoder["config"]["dtype"] = dtype
            config["vision_encoder"] = keras.layers.deserialize(encoder)
        return cls(**config)


def _is_policy_map(dtype):
    """Whether `dtype` is a `DTypePolicyMap`, or one serialized."""
    if isinstance(dtype, dict):
        return dtype.get("class_name") == "DTypePolicyMap"
    return isinstance(dtype, keras.dtype_policies.DTypePolicyMap)
