"""Rematerialised decoder blocks (`QwenVLBackbone(remat=True)`) and ViT
blocks (`QwenVLVisionEncoder(remat=True)`): the same training step, with
activations recomputed in the backward pass."""

import keras
import numpy as np
import pytest

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl import QwenVLVisionEncoder
from keras_qwenvl import remat as remat_module
from keras_qwenvl import vision_encoder as vision_encoder_module
from tests.test_fused_loss import assert_same_step
from tests.test_loss_positions import multimodal_batch
from tests.test_loss_positions import to_np
from tests.test_model import tiny_backbone
from tests.test_model import tiny_encoder


def sgd_step(remat, dropout=0.0, vision_remat=False):
    keras.utils.set_random_seed(0)  # `tiny_backbone` seeds after this draw
    backbone = tiny_backbone(
        remat=remat,
        dropout=dropout,
        vision_encoder=tiny_encoder(remat=vision_remat),
    )
    model = QwenVLCausalLM(backbone)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    logs = model.train_on_batch(*multimodal_batch(seed=4), return_dict=True)
    return logs["loss"], [to_np(v) for v in model.weights]


def jax_step_temp_bytes(layer, inputs):
    """XLA's temporary memory of a compiled SGD step of `layer` on
    `inputs` (loss: the sum of the squared outputs)."""
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def step(trainable):
        def loss(trainable):
            out, _ = layer.stateless_call(
                trainable, frozen, inputs, training=True
            )
            return (out**2).sum()

        gradients = jax.grad(loss)(trainable)
        return [w - 0.1 * g for w, g in zip(trainable, gradients)]

    compiled = jax.jit(step, donate_argnums=0).lower(trainable)
    return compiled.compile().memory_analysis().temp_size_in_bytes


def test_remat_step_equals_the_plain_step():
    loss, weights = sgd_step(False)
    remat_loss, remat_weights = sgd_step(True)
    assert remat_loss == pytest.approx(loss, rel=1e-6)
    assert_same_step(weights, remat_weights, rtol=1e-5)


def test_vision_remat_step_equals_the_plain_step(monkeypatch):
    loss, weights = sgd_step(False)
    blocks = []

    def spy(layer, forward, x):
        blocks.append(layer.name)
        return remat_module.rematerialized_call(layer, forward, x)

    monkeypatch.setattr(vision_encoder_module, "rematerialized_call", spy)
    remat_loss, remat_weights = sgd_step(False, vision_remat=True)
    assert {"vision_layer_0", "vision_layer_1"} <= set(blocks)
    assert remat_loss == pytest.approx(loss, rel=1e-6)
    assert_same_step(weights, remat_weights, rtol=1e-5)


def test_vision_remat_round_trips_through_the_config():
    encoder = tiny_encoder(remat=True)
    restored = QwenVLVisionEncoder.from_config(encoder.get_config())
    assert restored.remat
    assert all(layer.remat for layer in restored.vision_layers)
    plain = tiny_encoder()
    assert not any(layer.remat for layer in plain.vision_layers)
    plain.remat = True  # e.g. on a backbone loaded with `from_preset`
    assert all(layer.remat for layer in plain.vision_layers)
    assert plain.get_config()["remat"]


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
        return jax_step_temp_bytes(backbone, x)

    ours = temp_bytes()
    monkeypatch.setattr(
        remat_module, "_jax_tied_remat",
        lambda forward, variables, x: keras.remat(forward)(x),
    )
    untied = temp_bytes()
    probabilities_bytes = rows * heads * length * length * 4
    assert untied - ours >= (layers - 1) * probabilities_bytes, (ours, untied)


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of a compiled training step (JAX)",
)
def test_jax_vision_remat_keeps_less():
    """A trained ViT keeps, per block, its patches' activations and one
    attention-probabilities array per image; rematerialised, it keeps the
    blocks' inputs and one block's activations at a time."""
    layers, heads, images, image_size, patch = 4, 4, 4, 112, 7
    patches = (image_size // patch) ** 2
    pixels = np.random.default_rng(0).random(
        (images, image_size, image_size, 3)
    ).astype("float32")

    def temp_bytes(remat):
        keras.utils.set_random_seed(0)
        encoder = tiny_encoder(
            image_size=image_size, patch_size=patch, width=64,
            num_layers=layers, num_heads=heads, intermediate_dim=128,
            remat=remat,
        )
        return jax_step_temp_bytes(encoder, pixels)

    plain, ours = temp_bytes(False), temp_bytes(True)
    probabilities_bytes = images * heads * patches * patches * 4
    assert plain - ours >= (layers - 1) * probabilities_bytes, (ours, plain)
