"""`exact_gelu`: Keras' exact GELU, written with erf on JAX."""

import math
import re

import keras
import numpy as np
import pytest
from keras import ops

from gradients import gradient

from keras_qwenvl.activations import exact_gelu
from keras_qwenvl.vision_encoder import QwenVLVisionBlock


def inputs():
    """A sweep over both tails and the middle, and normal draws."""
    sweep = np.linspace(-12.0, 12.0, 4801)
    draws = np.random.default_rng(0).normal(size=4000) * 3.0
    return np.concatenate([sweep, draws]).astype("float32")


def test_values_equal_keras_gelu_and_the_float64_function():
    x = inputs()
    ours = ops.convert_to_numpy(exact_gelu(x))
    keras_gelu = ops.convert_to_numpy(ops.gelu(x, approximate=False))
    erf = np.vectorize(math.erf)
    exact = x * 0.5 * (1.0 + erf(x.astype("float64") / math.sqrt(2.0)))
    # float32 rounding of values up to 12: a few 1e-7 apart at most
    np.testing.assert_allclose(ours, keras_gelu, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(ours, exact, rtol=1e-6, atol=2e-6)
    assert ours.dtype == np.float32


def test_gradient_equals_keras_gelu():
    x = inputs()
    weights = np.random.default_rng(1).normal(size=x.shape).astype("float32")

    def weighted(gelu):
        return lambda v: ops.sum(gelu(v) * ops.convert_to_tensor(weights))

    ours = gradient(weighted(exact_gelu), x)
    theirs = gradient(
        weighted(lambda v: ops.gelu(v, approximate=False)), x
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6)
    assert np.abs(ours).max() > 1.0  # not a zero gradient


def test_bfloat16_stays_bfloat16_and_close():
    x = ops.cast(inputs(), "bfloat16")
    ours = exact_gelu(x)
    assert keras.backend.standardize_dtype(ours.dtype) == "bfloat16"
    theirs = ops.gelu(x, approximate=False)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(ours, "float32")),
        ops.convert_to_numpy(ops.cast(theirs, "float32")),
        rtol=1e-2, atol=2e-2,
    )


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the erf formulation is JAX's (other backends keep Keras' op)",
)
def test_vision_block_computes_erf_not_erfc():
    """The ViT block's MLP goes through erf: `jax.nn.gelu` (Keras' op on
    JAX) expands erfc, which XLA's CPU compiler runs about 3x slower."""
    import jax

    block = QwenVLVisionBlock(num_heads=2, intermediate_dim=24)
    block.build((None, 5, 8))
    x = np.random.default_rng(0).normal(size=(1, 5, 8)).astype("float32")
    variables = [v.value for v in block.trainable_variables]
    jaxpr = str(
        jax.make_jaxpr(lambda w, x: block.stateless_call(w, [], x)[0])(
            variables, x
        )
    )
    assert re.search(r"\berf\b", jaxpr)
    assert not re.search(r"\berfc\b", jaxpr)
