"""Initialisation of multi-head projection kernels.

The attention projections keep their heads as kernel axes, e.g. a query
kernel of shape `(hidden, heads, head_dim)`. Keras' fan-based initializers
(`glorot_uniform`, `he_normal`, ...) read a kernel of three or more axes as
a convolution, taking every leading axis as receptive field: for
`(hidden, heads, head_dim)` they would use fans of `heads * hidden` and
`head_dim * hidden`, and draw weights several times too small, so that a
model trained from scratch starts with uniform attention everywhere.
`projection_initializer` draws such a kernel as the matrix it is (for the
query, `(hidden, heads * head_dim)`) and reshapes it.

An unseeded Keras initializer returns the same values at every call, so each
kernel gets its own clone (otherwise the query, key and value kernels of a
layer would start equal), and `FreshDraws` clones at every call for a layer
that draws several weights from one initializer (the token embedding and the
untied lm_head).
"""

import math

import keras
from keras import ops
from keras_hub.src.utils.keras_utils import clone_initializer


def projection_initializer(initializer, fan_in, fan_out):
    """An initializer drawing a kernel as a `(fan_in, fan_out)` matrix.

    Args:
        initializer: a Keras initializer or its name.
        fan_in: the number of inputs of the projection (for an output
            projection `(heads, head_dim, hidden)`, `heads * head_dim`).
        fan_out: the number of outputs.

    Returns:
        A callable `(shape, dtype=None) -> tensor` for the kernel of any
        shape with `fan_in * fan_out` entries.
    """
    initializer = clone_initializer(keras.initializers.get(initializer))

    def initialize(shape, dtype=None):
        if math.prod(shape) != fan_in * fan_out:
            raise ValueError(
                f"A kernel of shape {tuple(shape)} is not a "
                f"({fan_in}, {fan_out}) projection."
            )
        return ops.reshape(initializer((fan_in, fan_out), dtype=dtype), shape)

    return initialize


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class FreshDraws(keras.initializers.Initializer):
    """Wraps an initializer so that every call draws new values.

    Args:
        initializer: a Keras initializer or its name.
    """

    def __init__(self, initializer):
        self.initializer = keras.initializers.get(initializer)

    def __call__(self, shape, dtype=None):
        return clone_initializer(self.initializer)(shape, dtype=dtype)

    def get_config(self):
        return {
            "initializer": keras.initializers.serialize(self.initializer)
        }
