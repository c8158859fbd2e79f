"""The vision encoder's LayerNorm."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLLayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis, computed as the
    centred input over its root mean square: `(x - mean) * rsqrt(mean((x -
    mean)^2) + eps) * gamma + beta`, in float32.

    Same weights ("gamma", "beta"), configuration and numbers as the Keras
    layer (to float32 rounding); only the formulation differs. Keras' op
    folds the mean into an offset (`x * inv - mean * inv`), and in a deep
    stack XLA's CPU compiler fuses the backward passes of those layers so
    that each layer's input gradient recomputes the residual-gradient terms
    of every layer above it (fusions of up to 175 operands in the "base"
    ViT of benchmarks/benchmark.py: 12 layers, 1,024 patches). With the
    input centred first the longest has 57, and a training step of that
    ViT on its own took 17.1 instead of 20.2 s on a 2-core CPU (JAX; README,
    "Benchmarks"). On PyTorch Keras calls torch's fused layer-norm kernel,
    which is kept; so are axes other than the last.
    """

    def call(self, inputs):
        if keras.backend.backend() == "torch" or self.rms_scaling or (
            list(self.axis) not in ([-1], [len(inputs.shape) - 1])
        ):
            return super().call(inputs)
        x = ops.cast(inputs, "float32")
        centred = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(centred), axis=-1, keepdims=True)
        outputs = centred * ops.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            outputs = outputs * ops.cast(self.gamma, "float32")
        if self.beta is not None:
            outputs = outputs + ops.cast(self.beta, "float32")
        return ops.cast(outputs, self.compute_dtype)
