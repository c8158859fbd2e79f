"""The lm_head applied inside the loss during `fit()`
(`QwenVLCrossEntropy.from_hidden_states`): the same loss, accuracy and
updated weights as the logits, block by block, on every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl import QwenVLCrossEntropy
from keras_qwenvl.causal_lm_preprocessor import select_loss_positions
from tests.test_loss_positions import multimodal_batch
from tests.test_loss_positions import to_np
from tests.test_model import tiny_backbone


def hidden_batch(seed=0, shape=(3, 5), hidden=16, vocabulary=37):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=shape + (hidden,)).astype("float32")
    kernel = (rng.normal(size=(hidden, vocabulary)) * 0.5).astype("float32")
    labels = rng.integers(0, vocabulary, shape).astype("int32")
    weights = rng.uniform(0, 2, shape).astype("float32")
    weights[0, :2] = 0.0
    return h, kernel, labels, weights


@pytest.mark.parametrize(
    "reduction", ["sum", "sum_over_batch_size", "mean_with_sample_weight"]
)
@pytest.mark.parametrize(
    "arguments",
    [
        {"chunk_size": 4},  # 15 positions: 4 blocks
        {"chunk_size": 256},  # 1 block
        {"remat": True, "vocabulary_block_size": 8},  # 37: 4 blocks + 5
        {"remat": True, "vocabulary_block_size": 64},  # 1 block
    ],
)
def test_from_hidden_states_equals_the_loss_on_logits(reduction, arguments):
    h, kernel, labels, weights = hidden_batch()
    loss = QwenVLCrossEntropy(reduction=reduction, **arguments)
    logits = h @ kernel
    for sample_weight in (None, weights):
        value, correct, total = loss.from_hidden_states(
            labels, h, kernel, sample_weight
        )
        expected = loss(labels, logits, sample_weight)
        np.testing.assert_allclose(to_np(value), to_np(expected), rtol=1e-5)
        w = np.ones_like(weights) if sample_weight is None else weights
        hits = (logits.argmax(-1) == labels).astype("float32")
        assert 0 < hits.sum() < hits.size  # the count can be wrong
        np.testing.assert_allclose(to_np(correct), (w * hits).sum(), rtol=1e-6)
        np.testing.assert_allclose(to_np(total), w.sum(), rtol=1e-6)


def test_no_fused_reduction_and_bad_chunk_size_are_refused():
    h, kernel, labels, _ = hidden_batch()
    with pytest.raises(ValueError, match="reduction=None"):
        QwenVLCrossEntropy(reduction=None).from_hidden_states(labels, h, kernel)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive"):
        QwenVLCrossEntropy(chunk_size=0)
    with pytest.raises(
        ValueError, match="`vocabulary_block_size` must be a positive"
    ):
        QwenVLCrossEntropy(remat=True, vocabulary_block_size=2.5)
    restored = keras.losses.deserialize(
        keras.losses.serialize(
            QwenVLCrossEntropy(
                chunk_size=64, remat=True, vocabulary_block_size=100
            )
        )
    )
    assert restored.chunk_size == 64
    assert restored.remat is True
    assert restored.vocabulary_block_size == 100


class Spy:
    """Records the calls of `from_hidden_states` (made while tracing on
    JAX and TensorFlow, at every step on PyTorch)."""

    def __init__(self, monkeypatch):
        self.kernel_gradients = []
        original = QwenVLCrossEntropy.from_hidden_states

        def spy(loss, *args, kernel_gradient=True, **kwargs):
            self.kernel_gradients.append(kernel_gradient)
            return original(
                loss, *args, kernel_gradient=kernel_gradient, **kwargs
            )

        monkeypatch.setattr(QwenVLCrossEntropy, "from_hidden_states", spy)


def train_one_step(
    fused, batch, freeze_head=False, dtype=None, tied=False, loss="auto"
):
    backbone = tiny_backbone(dtype=dtype, tie_word_embeddings=tied)
    model = QwenVLCausalLM(backbone)  # seeded weights
    if freeze_head:
        model.backbone.token_embedding.trainable = False
    if fused:  # the defaults: the lm_head goes inside the loss
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    else:  # an explicit metric needs the logits
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
        )
    logs = model.train_on_batch(*batch, return_dict=True)
    return model, logs, [to_np(v) for v in model.weights]


def assert_same_step(after, other_after, rtol):
    """Two SGD steps of `tiny_backbone`'s model updated every weight alike,
    and most weights moved."""
    initial = [to_np(v) for v in QwenVLCausalLM(tiny_backbone()).weights]
    moved = 0
    for start, a, b in zip(initial, after, other_after):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-6)
        moved += not np.allclose(start, a)
    assert moved > len(initial) // 2


# `tiny_backbone`'s 300 entries in blocks of 64: 4 in a loop, then 44.
REMAT_LOSS = QwenVLCrossEntropy(remat=True, vocabulary_block_size=64)


@pytest.mark.parametrize(
    "selected, loss",
    [(False, "auto"), (True, "auto"), (True, REMAT_LOSS)],
)
def test_fit_step_equals_the_step_on_logits(selected, loss, monkeypatch):
    x, y, weights = multimodal_batch(seed=1)
    batch = (x, y, weights)
    if selected:
        batch = select_loss_positions(x, y, weights, 8)
    spy = Spy(monkeypatch)
    _, logs, after = train_one_step(False, batch)
    assert spy.kernel_gradients == []
    _, fused_logs, fused_after = train_one_step(True, batch, loss=loss)
    assert spy.kernel_gradients and all(spy.kernel_gradients)
    assert set(fused_logs) == set(logs) == {
        "loss", "sparse_categorical_accuracy"
    }
    assert fused_logs["loss"] == pytest.approx(logs["loss"], rel=1e-5)
    assert fused_logs["sparse_categorical_accuracy"] == pytest.approx(
        logs["sparse_categorical_accuracy"], abs=1e-7
    )
    assert_same_step(after, fused_after, rtol=1e-4)


@pytest.mark.parametrize("loss", ["auto", REMAT_LOSS])
def test_frozen_lm_head_skips_its_gradient(loss, monkeypatch):
    batch = select_loss_positions(*multimodal_batch(seed=2), 8)
    spy = Spy(monkeypatch)
    model, logs, after = train_one_step(False, batch, freeze_head=True)
    _, fused_logs, fused_after = train_one_step(
        True, batch, freeze_head=True, loss=loss
    )
    assert spy.kernel_gradients and not any(spy.kernel_gradients)
    assert fused_logs["loss"] == pytest.approx(logs["loss"], rel=1e-5)
    for a, b in zip(after, fused_after):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    head = model.backbone.token_embedding.reverse_embeddings
    untouched = QwenVLCausalLM(tiny_backbone()).backbone.token_embedding
    np.testing.assert_array_equal(
        to_np(head), to_np(untouched.reverse_embeddings)
    )


@pytest.mark.parametrize("loss", ["auto", REMAT_LOSS])
def test_tied_embeddings_fused_step(loss, monkeypatch):
    """A tied lm_head (the embedding's transpose) gets both gradients."""
    batch = select_loss_positions(*multimodal_batch(seed=5), 8)
    spy = Spy(monkeypatch)
    _, logs, after = train_one_step(False, batch, tied=True)
    _, fused_logs, fused_after = train_one_step(
        True, batch, tied=True, loss=loss
    )
    assert spy.kernel_gradients and all(spy.kernel_gradients)
    assert fused_logs["loss"] == pytest.approx(logs["loss"], rel=1e-5)
    for a, b in zip(after, fused_after):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_evaluate_and_fit_after_the_fused_step():
    """`evaluate()` takes the logits; both log the same metrics."""
    x, y, weights = select_loss_positions(*multimodal_batch(seed=3), 8)
    model = QwenVLCausalLM(tiny_backbone())
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, y, sample_weight=weights, epochs=2, verbose=0)
    assert set(history.history) == {"loss", "sparse_categorical_accuracy"}
    logs = model.evaluate(x, y, sample_weight=weights, return_dict=True)
    logits = to_np(model(x))
    hits = (logits.argmax(-1) == y).astype("float32")
    accuracy = (hits * weights).sum() / weights.sum()
    assert logs["sparse_categorical_accuracy"] == pytest.approx(accuracy)
    expected = QwenVLCrossEntropy()(y, logits, weights)
    assert logs["loss"] == pytest.approx(float(to_np(expected)), rel=1e-5)


@pytest.mark.parametrize("loss", ["auto", REMAT_LOSS])
def test_bfloat16_fused_step_trains(loss, monkeypatch):
    batch = select_loss_positions(*multimodal_batch(seed=4), 8)
    spy = Spy(monkeypatch)
    _, logs, after = train_one_step(False, batch, dtype="mixed_bfloat16")
    _, fused_logs, fused_after = train_one_step(
        True, batch, dtype="mixed_bfloat16", loss=loss
    )
    assert spy.kernel_gradients
    assert np.isfinite(fused_logs["loss"])
    assert fused_logs["loss"] == pytest.approx(logs["loss"], rel=1e-2)
    initial = [to_np(v) for v in QwenVLCausalLM(tiny_backbone()).weights]
    head = [i for i, v in enumerate(initial) if v.shape == (32, 300)]
    for i in head:  # the lm_head moved, as the logits' step moved it
        step = after[i] - initial[i]
        fused_step = fused_after[i] - initial[i]
        assert np.abs(fused_step).max() > 0
        np.testing.assert_allclose(
            fused_step, step, atol=2e-2 * np.abs(step).max()
        )


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of the compiled gradient (JAX)",
)
def test_blocks_bound_the_gradients_memory():
    """Smaller blocks need less of XLA's temporary memory than the
    logits' own gradient: the (positions, vocabulary) arrays shrink to a
    block's."""
    import jax

    h, kernel, labels, weights = hidden_batch(
        shape=(2, 256), hidden=32, vocabulary=4096
    )

    def temp_bytes(value):
        compiled = jax.jit(jax.grad(value, argnums=(0, 1))).lower(h, kernel)
        return compiled.compile().memory_analysis().temp_size_in_bytes

    def fused(chunk_size):
        loss = QwenVLCrossEntropy(chunk_size=chunk_size)
        return lambda h, k: loss.from_hidden_states(labels, h, k, weights)[0]

    def on_logits(h, k):
        return QwenVLCrossEntropy()(labels, ops.matmul(h, k), weights)

    logits_bytes = 512 * 4096 * 4
    blocks, whole = temp_bytes(fused(64)), temp_bytes(on_logits)
    assert whole - blocks >= logits_bytes, (blocks, whole)


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of the compiled gradient (JAX)",
)
def test_vocabulary_blocks_keep_no_logits_sized_array():
    """With `remat=True` the gradient's temporary memory is a few
    (positions, block) arrays; the one-block path holds the logits."""
    import jax

    h, kernel, labels, weights = hidden_batch(
        shape=(2, 256), hidden=32, vocabulary=4096
    )

    def temp_bytes(loss):
        def value(h, k):
            return loss.from_hidden_states(labels, h, k, weights)[0]

        compiled = jax.jit(jax.grad(value, argnums=(0, 1))).lower(h, kernel)
        return compiled.compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 512 * 4096 * 4
    one_block = temp_bytes(QwenVLCrossEntropy())
    by_vocabulary = temp_bytes(
        QwenVLCrossEntropy(remat=True, vocabulary_block_size=256)
    )
    assert one_block >= logits_bytes, one_block
    # Blocks of 256 are 1/16 of the logits.
    assert by_vocabulary < logits_bytes / 4, by_vocabulary


def test_remat_backbone_compiles_the_remat_loss_on_jax():
    model = QwenVLCausalLM(tiny_backbone(remat=True))
    model.compile()
    assert isinstance(model.loss, QwenVLCrossEntropy)
    assert model.loss.remat == (keras.backend.backend() == "jax")
    model = QwenVLCausalLM(tiny_backbone())
    model.compile()
    assert not model.loss.remat


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's compiled training step (JAX)",
)
def test_training_step_keeps_no_copy_of_the_lm_head():
    """The input gradient reads the kernel that the update overwrites in
    place: the loss orders that read first, so XLA copies no kernel."""
    import jax

    h, kernel, labels, weights = hidden_batch(
        shape=(2, 64), hidden=32, vocabulary=4096
    )
    projection = np.eye(32, dtype="float32")
    loss = QwenVLCrossEntropy()

    def step(weights_):
        def value(weights_):
            w, k = weights_
            return loss.from_hidden_states(labels, h @ w, k, weights)[0]

        gradients = jax.grad(value)(weights_)
        return [w - 0.1 * g for w, g in zip(weights_, gradients)]

    hlo = jax.jit(step, donate_argnums=0).lower([projection, kernel])
    copies = [
        line for line in hlo.compile().as_text().splitlines()
        if " copy(" in line and "f32[32,4096]" in line.split(" copy(")[0]
    ]
    assert not copies, copies


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's compiled training step (JAX)",
)
@pytest.mark.parametrize("remat", [False, True])
def test_kernel_gradient_is_a_plain_matmul(remat):
    """The kernel's gradient, hidden^T @ grad_logits, reaches XLA as a
    matmul that contracts its left operand's last axis: one contracting
    the first runs outside XLA's fused CPU matmuls, with an output-sized
    buffer of its own (`ordering.materialized`)."""
    import jax

    h, kernel, labels, weights = hidden_batch(
        shape=(2, 64), hidden=32, vocabulary=4096
    )
    loss = QwenVLCrossEntropy(remat=remat, vocabulary_block_size=1024)

    def gradient(h, k):  # `h` an input: XLA does not fold its transpose
        return jax.grad(
            lambda h, k: loss.from_hidden_states(labels, h, k, weights)[0],
            argnums=(0, 1),
        )(h, k)

    hlo = jax.jit(gradient).lower(h, kernel).compile().as_text()
    shape = "f32[32,4096]" if not remat else "f32[32,1024]"
    dots = [
        line for line in hlo.splitlines()
        if " dot(" in line and shape in line.split(" dot(")[0]
    ]
    assert dots
    for line in dots:
        assert "lhs_contracting_dims={1}" in line, line
