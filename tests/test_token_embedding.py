"""`QwenVLTokenEmbedding`: keras-hub's `ReversibleEmbedding` with the same
numbers, whose table gradient on JAX is made only once the looked-up rows'
gradient exists, and whose lm_head on PyTorch on CPU runs through oneDNN
where no gradient is needed."""

import contextlib

import keras
import numpy as np
import pytest
from keras_hub.layers import ReversibleEmbedding

from keras_qwenvl.token_embedding import QwenVLTokenEmbedding
from tests.test_fused_loss import train_one_step
from tests.test_loss_positions import multimodal_batch
from tests.test_loss_positions import to_np
from tests.test_model import tiny_backbone


def use_keras_hubs_lookup(monkeypatch):
    monkeypatch.setattr(QwenVLTokenEmbedding, "call", ReversibleEmbedding.call)


@pytest.mark.parametrize(
    "dtype, tied, tolerance",
    [("float32", False, 1e-6), ("float32", True, 1e-6),
     ("bfloat16", False, 1e-2)],
)
def test_training_step_equals_keras_hubs_lookup(
    dtype, tied, tolerance, monkeypatch
):
    x, y, weights = multimodal_batch(seed=3)
    model, logs, ours = train_one_step(True, (x, y, weights), dtype=dtype,
                                       tied=tied)
    use_keras_hubs_lookup(monkeypatch)
    _, their_logs, theirs = train_one_step(True, (x, y, weights),
                                           dtype=dtype, tied=tied)
    assert logs["loss"] == pytest.approx(their_logs["loss"], rel=tolerance)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)
    if tied:
        return
    # SGD: no row outside the batch moved; most of its rows did (not the
    # image span's, replaced by image features, nor those after the loss).
    table = to_np(model.backbone.token_embedding.embeddings)
    start = to_np(tiny_backbone(dtype=dtype).token_embedding.embeddings)
    moved = np.any(table != start, axis=-1)
    used = np.zeros(len(table), bool)
    used[np.asarray(x["token_ids"]).ravel()] = True
    np.testing.assert_array_equal(moved[~used], False)
    assert moved[used].sum() >= used.sum() // 2


def test_quantized_and_reverse_calls_are_keras_hubs():
    layer = QwenVLTokenEmbedding(50, 8)
    layer.build()
    reference = ReversibleEmbedding(50, 8)
    reference.build()
    reference.set_weights(layer.get_weights())
    ids = np.arange(12, dtype="int32").reshape(3, 4)
    hidden = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    for inputs, reverse in ((ids, False), (hidden, True)):
        np.testing.assert_allclose(
            to_np(layer(inputs, reverse=reverse)),
            to_np(reference(inputs, reverse=reverse)),
            rtol=1e-6, atol=1e-6,
        )
    layer.quantize("int8", type_check=False)
    reference.quantize("int8", type_check=False)
    np.testing.assert_array_equal(to_np(layer(ids)), to_np(reference(ids)))


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of a compiled training step (JAX)",
)
def test_adamw_step_holds_the_table_gradient_for_less_time(monkeypatch):
    """With keras-hub's lookup XLA's CPU scheduler makes the table-sized
    zeros of its gradient before the activations are freed; with ours the
    step's temporary memory is smaller by at least the table."""
    import jax

    vocabulary, hidden = 20000, 64
    ids = np.random.default_rng(0).integers(0, vocabulary, (4, 256))
    x = {"token_ids": ids.astype("int32"),
         "padding_mask": np.ones(ids.shape, "int32")}

    def temp_bytes():
        backbone = tiny_backbone(
            vision=False, vocabulary_size=vocabulary, hidden_dim=hidden,
            intermediate_dim=128, seq_length=256,
        )
        optimizer = keras.optimizers.AdamW()
        optimizer.build(backbone.trainable_variables)
        trainable = [v.value for v in backbone.trainable_variables]
        frozen = [v.value for v in backbone.non_trainable_variables]

        def step(trainable, optimizer_variables):
            def loss(trainable):
                out, _ = backbone.stateless_call(
                    trainable, frozen, x, training=True
                )
                return (out**2).sum()

            gradients = jax.grad(loss)(trainable)
            return optimizer.stateless_apply(
                optimizer_variables, gradients, trainable
            )

        optimizer_variables = [v.value for v in optimizer.variables]
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            trainable, optimizer_variables
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp_bytes()
    use_keras_hubs_lookup(monkeypatch)
    theirs = temp_bytes()
    assert theirs - ours >= vocabulary * hidden * 4, (ours, theirs)


# === The lm_head where no gradient is needed (PyTorch: oneDNN) ===


def no_gradient():
    """What `generate()` and `predict()` run under on each backend."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def count_calls(monkeypatch, owner, name):
    """Records the shape of the first argument of every call of
    `owner.name` (which still runs)."""
    calls = []
    function = getattr(owner, name)

    def counting(first, *args):
        calls.append(tuple(first.shape))
        return function(first, *args)

    monkeypatch.setattr(owner, name, counting)
    return calls


def count_onednn_products(monkeypatch):
    """Counts the lm_head products that go through oneDNN (PyTorch)."""
    from keras_qwenvl import torch_cpu_logits

    return count_calls(monkeypatch, torch_cpu_logits, "matmul")


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_without_gradient_is_the_product(tied, monkeypatch):
    """The logits of a call that needs no gradient are `hidden @ kernel`
    (float32 rounding), for 2-D and 3-D inputs; on PyTorch on CPU they
    come from oneDNN."""
    layer = QwenVLTokenEmbedding(300, 16, tie_weights=tied)
    layer.build()
    kernel = to_np(layer.embeddings).T if tied else to_np(
        layer.reverse_embeddings
    )
    if keras.backend.backend() == "torch":
        from keras_qwenvl import torch_cpu_logits

        calls = count_onednn_products(monkeypatch)
    rng = np.random.default_rng(0)
    for shape in ((3, 16), (2, 5, 16)):
        hidden = rng.normal(size=shape).astype("float32")
        with no_gradient():
            logits = to_np(layer(hidden, reverse=True))
        assert logits.shape == shape[:-1] + (300,)
        np.testing.assert_allclose(
            logits, hidden @ kernel, rtol=1e-5, atol=1e-5
        )
    if keras.backend.backend() == "torch":
        expected = [(3, 16), (2, 5, 16)] if torch_cpu_logits.available() else []
        assert calls == expected


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="PyTorch's oneDNN lm_head"
)
def test_torch_lm_head_with_gradient_is_keras_hubs(monkeypatch):
    """Where a gradient is recorded the lm_head is keras-hub's product, and
    the kernel's gradient is the product's; bfloat16 and quantized calls
    keep keras-hub's path too."""
    import torch

    calls = count_onednn_products(monkeypatch)
    layer = QwenVLTokenEmbedding(300, 16, tie_weights=False)
    layer.build()
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(4, 16)).astype("float32")
    upstream = rng.normal(size=(4, 300)).astype("float32")
    logits = layer(torch.tensor(hidden), reverse=True)
    (logits * torch.tensor(upstream)).sum().backward()
    kernel = layer.reverse_embeddings.value
    np.testing.assert_allclose(
        kernel.grad.numpy(), hidden.T @ upstream, rtol=1e-5, atol=1e-5
    )
    assert calls == []

    with torch.no_grad():
        bf16 = QwenVLTokenEmbedding(300, 16, dtype="bfloat16")
        bf16.build()
        bf16(hidden, reverse=True)
        layer.quantize("int8", type_check=False)
        layer(hidden, reverse=True)
    assert calls == []


def count_int8_products(monkeypatch):
    """Counts the int8 lm_head products by the path each backend takes on
    CPU: `torch._int_mm` on PyTorch, the blocked loop on JAX and
    TensorFlow."""
    from keras_qwenvl import narrow_products

    if keras.backend.backend() == "torch":
        import torch

        return count_calls(monkeypatch, torch, "_int_mm")
    return count_calls(monkeypatch, narrow_products, "_blocked_product")


@pytest.mark.parametrize(
    "tied, soft_cap, vocabulary, block_bytes",
    # 4 * 8 * 7 bytes: at most 7 rows of 8 a block; 50 = 10 blocks of 5,
    # 53 (prime) = 7 blocks of 7 and a remainder of 4.
    [(False, None, 50, None), (True, None, 50, None),
     (False, 30.0, 50, 4 * 8 * 7), (False, None, 53, 4 * 8 * 7),
     (True, None, 53, 4 * 8 * 7)],
)
def test_int8_lm_head_is_keras_hubs(
    tied, soft_cap, vocabulary, block_bytes, monkeypatch
):
    """The int8 lm_head (the untied table laid out by vocabulary rows, the
    product by `narrow_products`) gives keras-hub's int8 logits."""
    from keras_qwenvl import narrow_products

    if block_bytes is not None:
        monkeypatch.setattr(narrow_products, "BLOCK_BYTES", block_bytes)
    kwargs = dict(tie_weights=tied, logit_soft_cap=soft_cap)
    layer = QwenVLTokenEmbedding(vocabulary, 8, **kwargs)
    layer.build()
    reference = ReversibleEmbedding(vocabulary, 8, **kwargs)
    reference.build()
    reference.set_weights(layer.get_weights())
    layer.quantize("int8", type_check=False)
    reference.quantize("int8", type_check=False)
    if not tied:
        assert tuple(layer.reverse_embeddings.shape) == (vocabulary, 8)
        assert layer.reverse_embeddings.dtype == "int8"
        np.testing.assert_array_equal(
            to_np(layer.reverse_embeddings),
            to_np(reference.reverse_embeddings).T,
        )
    calls = count_int8_products(monkeypatch)
    hidden = np.random.default_rng(2).normal(size=(2, 3, 8)) * 4
    hidden = hidden.astype("float32")
    np.testing.assert_allclose(
        to_np(layer(hidden, reverse=True)),
        to_np(reference(hidden, reverse=True)),
        rtol=1e-6, atol=1e-6,
    )
    assert len(calls) == 1


def test_int8_blocks_divide_the_vocabulary():
    """Blocks divide the vocabulary where a divisor near the cache-sized
    block exists (one loop, no remainder product), each block's float32
    copy within `BLOCK_BYTES` and at least a quarter of it."""
    from keras_qwenvl.narrow_products import BLOCK_BYTES
    from keras_qwenvl.narrow_products import block_rows

    for vocabulary, hidden in ((151936, 512), (151936, 4096), (32000, 4096)):
        rows = block_rows(vocabulary, hidden)
        assert vocabulary % rows == 0
        assert BLOCK_BYTES // 4 >= rows * hidden >= BLOCK_BYTES // 16
    assert block_rows(151936, 512) == 1187  # 128 blocks
    assert block_rows(53, 8) == 53  # a whole small table is one block


def test_int8_model_saves_and_loads(tmp_path):
    """A quantized model goes through a preset: the loaded model quantizes
    the same layers (the vision encoder's too), builds the untied int8
    table by rows, and computes the same hidden states and logits."""
    from keras_qwenvl import QwenVLCausalLM
    from tests.test_model import tiny_causal_lm
    from tests.test_quantize import quantized_layers

    lm = tiny_causal_lm(str(tmp_path))
    lm.quantize("int8")
    head = lm.backbone.token_embedding
    assert not head.tie_weights
    lm.save_to_preset(str(tmp_path / "int8"))
    loaded = QwenVLCausalLM.from_preset(str(tmp_path / "int8"))
    assert quantized_layers(loaded.backbone) == quantized_layers(lm.backbone)
    loaded_head = loaded.backbone.token_embedding
    assert tuple(loaded_head.reverse_embeddings.shape) == (
        head.input_dim, head.output_dim
    )
    image = np.random.default_rng(3).uniform(0, 255, (40, 30, 3))
    x = lm.preprocessor.generate_preprocess(
        {"prompts": ["<img></img> a shape"], "images": [[image]]},
        sequence_length=16,
    )
    hidden = [to_np(m.backbone.predict_on_batch(x)) for m in (lm, loaded)]
    np.testing.assert_array_equal(hidden[1], hidden[0])
    np.testing.assert_array_equal(
        to_np(loaded_head(hidden[0], reverse=True)),
        to_np(head(hidden[0], reverse=True)),
    )


# === bfloat16 tables: the lm_head's product and the lookup on JAX ===


@pytest.mark.parametrize("tied, rows", [(False, 1), (True, 3), (False, 9)])
def test_bfloat16_decoding_logits_are_the_tables_product(
    tied, rows, monkeypatch
):
    """`decoding_logits` of a bfloat16 table: the float32 product of the
    bfloat16 values, rounded to bfloat16. On JAX, up to
    `BFLOAT16_MAX_ROWS` rows, through `bfloat16_product` (here 7 blocks of
    7 vocabulary rows and a remainder of 4); elsewhere the layer's reverse
    call."""
    from keras import ops

    from keras_qwenvl import narrow_products

    monkeypatch.setattr(narrow_products, "BLOCK_BYTES", 4 * 8 * 7)
    calls = count_calls(monkeypatch, narrow_products, "bfloat16_product")
    layer = QwenVLTokenEmbedding(53, 8, tie_weights=tied, dtype="bfloat16")
    layer.build()
    hidden = np.random.default_rng(4).normal(size=(rows, 1, 8)) * 4
    hidden = ops.cast(hidden.astype("float32"), "bfloat16")
    logits = layer.decoding_logits(hidden)
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
    assert tuple(logits.shape) == (rows, 1, 53)
    kernel = to_np(ops.cast(layer._plain_reverse_kernel(), "float32"))
    expected = to_np(ops.cast(hidden, "float32")) @ kernel
    taken = keras.backend.backend() == "jax" and rows <= 8
    assert len(calls) == int(taken)
    np.testing.assert_allclose(
        to_np(ops.cast(logits, "float32")), expected,
        rtol=2.0**-8 if taken else 2.0**-6,
        atol=1e-6 if taken else 2.0**-6 * np.abs(expected).max(),
    )


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="JAX's bfloat16 paths"
)
def test_bfloat16_bits_widen_and_gather_exactly():
    """The 16 bits of bfloat16 values, widened by `narrow_products`' shift,
    are the values in float32, bit for bit (signed zeros, subnormals,
    infinities, NaN); and the table lookup gathers bfloat16 rows (as
    16-bit integers) that are the table's."""
    import jax.numpy as jnp
    import ml_dtypes

    from keras_qwenvl import narrow_products

    values = np.array(
        [0.0, -0.0, 1.0, -1.5, 3.14159, 1e-39, -3e-40, 65504.0, 3e38,
         np.inf, -np.inf, np.nan], "float32",
    ).astype(ml_dtypes.bfloat16)
    widened = narrow_products._bfloat16_bits_to_float32(
        jnp.asarray(values.view(np.uint16))
    )
    np.testing.assert_array_equal(
        np.asarray(widened).view(np.uint32),
        values.astype("float32").view(np.uint32),
    )
    layer = QwenVLTokenEmbedding(50, 8, dtype="bfloat16")
    layer.build()
    ids = np.array([[3, 49, 0], [7, 7, 12]], "int32")
    rows = layer(ids)
    assert rows.dtype == jnp.bfloat16
    table = np.asarray(layer.embeddings.value)
    np.testing.assert_array_equal(
        np.asarray(rows).view(np.uint16), table[ids].view(np.uint16)
    )
