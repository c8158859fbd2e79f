"""The gradient of a scalar function on the current Keras backend."""

import keras
import numpy as np


def gradient(fn, x):
    """d fn(x) / dx, `fn` returning a scalar, on the current backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(fn)(x))
    if backend == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        fn(x).backward()
        return x.grad.numpy()
    import tensorflow as tf

    x = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = fn(x)
    return tape.gradient(value, x).numpy()
