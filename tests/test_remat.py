"""Rematerialised decoder blocks (`QwenVLBackbone(remat=True)`): the same
training step, with activations recomputed in the backward pass."""

import keras
import numpy as np
import pytest

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl import remat as remat_module
from tests.test_fused_loss import assert_same_step
from tests.test_loss_positions import multimodal_batch
from tests.test_loss_positions import to_np
from tests.test_model import tiny_backbone


def sgd_step(remat, dropout=0.0):
    model = QwenVLCausalLM(tiny_backbone(remat=remat, dropout=dropout))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    logs = model.train_on_batch(*multimodal_batch(seed=4), return_dict=True)
    return logs["loss"], [to_np(v) for v in model.weights]


def test_remat_step_equals_the_plain_step():
    loss, weights = sgd_step(False)
    remat_loss, remat_weights = sgd_step(True)
    assert remat_loss == pytest.approx(loss, rel=1e-6)
    assert_same_step(weights, remat_weights, rtol=1e-5)


def test_remat_with_dropout():
    """Runs on PyTorch and TensorFlow; a clear error on JAX, where the
    dropout's random state cannot be updated inside the recomputed call."""
    if keras.backend.backend() == "jax":
        with pytest.raises(ValueError, match="dropout"):
            sgd_step(True, dropout=0.1)
        return
    loss, _ = sgd_step(True, dropout=0.1)
    assert np.isfinite(loss)


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of a compiled training step (JAX)",
)
def test_jax_recomputation_waits_for_the_backward_pass(monkeypatch):
    """With `keras.remat` alone XLA's CPU scheduler recomputes the blocks
    during the forward pass and keeps about as much as without remat;
    tied to the output's gradient the recomputation frees at least one
    attention-probabilities array per block but one."""
    import jax

    layers, heads, length, rows = 4, 4, 256, 4
    ids = np.random.default_rng(0).integers(0, 1000, (rows, length))
    x = {"token_ids": ids.astype("int32"),
         "padding_mask": np.ones(ids.shape, "int32")}

    def temp_bytes():
        backbone = tiny_backbone(
            vision=False, vocabulary_size=1000, hidden_dim=64,
            intermediate_dim=128, num_layers=layers, num_heads=heads,
            seq_length=length, remat=True,
        )
        trainable = [v.value for v in backbone.trainable_variables]
        frozen = [v.value for v in backbone.non_trainable_variables]

        def step(trainable):
            def loss(trainable):
                out, _ = backbone.stateless_call(
                    trainable, frozen, x, training=True
                )
                return (out**2).sum()

            gradients = jax.grad(loss)(trainable)
            return [w - 0.1 * g for w, g in zip(trainable, gradients)]

        compiled = jax.jit(step, donate_argnums=0).lower(trainable)
        return compiled.compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes()
    monkeypatch.setattr(
        remat_module, "_jax_tied_remat",
        lambda forward, variables, x: keras.remat(forward)(x),
    )
    untied = temp_bytes()
    probabilities_bytes = rows * heads * length * length * 4
    assert untied - ours >= (layers - 1) * probabilities_bytes, (ours, untied)
