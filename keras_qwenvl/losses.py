"""Next-token cross-entropy for the 151,936-entry vocabulary."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLCrossEntropy(keras.losses.Loss):
    """Cross-entropy of integer labels against logits: the same loss as
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` (same
    reduction and sample weighting, equal to float32 rounding), the
    default of `QwenVLCausalLM.compile(loss="auto")`.

    On JAX it is computed as `logsumexp(logits) - logits[label]`. Keras'
    JAX op multiplies the log-softmax by a one-hot array of the labels,
    one more (positions, vocabulary_size) float32 array in the compiled
    step: 311 MB for 512 positions at Qwen's vocabulary, and 0.25 GB of a
    "small" training step's peak memory (README, "Benchmarks"). PyTorch
    and TensorFlow keep Keras' op, which calls their fused kernels.
    """

    def __init__(self, name="qwen_vl_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        if keras.backend.backend() != "jax":
            return ops.sparse_categorical_crossentropy(
                y_true, y_pred, from_logits=True
            )
        # `Loss.__call__` has cast the logits to the loss's dtype already.
        labels = ops.expand_dims(ops.cast(y_true, "int32"), -1)
        picked = ops.take_along_axis(y_pred, labels, axis=-1)
        return ops.logsumexp(y_pred, axis=-1) - ops.squeeze(picked, -1)
