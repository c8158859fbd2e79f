"""Multi-device measurements for tests/test_distribution.py.

JAX fixes its device count when it starts, so these run in their own
process on 8 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/distributed_checks.py results.json

A tiny Qwen-VL is saved to a preset on one device; for each mesh it is
reloaded with `QwenVLCausalLM.from_preset` under `model_parallel(mesh)` and
compared with the single-device model: loss and gradients of a training
step, logits, greedy generation, the shardings of its weights; `fit()` runs
one step under `DataParallel` and `ModelParallel`. The measurements are
written as JSON; the test module asserts on them.
"""

import json
import os
import sys
import tempfile
import time

import jax
import keras
import numpy as np

from keras_qwenvl import QwenVLBackbone
from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl import QwenVLCausalLMPreprocessor
from keras_qwenvl import QwenVLImageConverter
from keras_qwenvl import QwenVLTokenizer
from keras_qwenvl import QwenVLVisionEncoder
from keras_qwenvl.distribution import model_parallel
from keras_qwenvl.tokenizer import write_byte_level_vocabulary

MESHES = ((8, 1), (4, 2), (2, 4))
QUERIES = 4
BATCH = 8  # divisible by every data axis
LENGTH = 16
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def tiny_model(folder):
    """Decoder 64 wide with 4 heads, ViT 32 wide with 4 heads and an MLP of
    42 (not divisible by 4: its rule falls back to replication on a
    4-way model axis), 4 adapter heads, vocabulary padded to 480 rows."""
    keras.utils.set_random_seed(0)
    vocabulary = write_byte_level_vocabulary(os.path.join(folder, "v.tiktoken"))
    tokenizer = QwenVLTokenizer(vocabulary, image_span_length=QUERIES)
    encoder = QwenVLVisionEncoder(
        image_size=28,
        patch_size=14,
        width=32,
        num_layers=2,
        num_heads=4,
        intermediate_dim=42,
        output_dim=64,
        num_queries=QUERIES,
        adapter_head_dim=16,
    )
    backbone = QwenVLBackbone(
        vocabulary_size=480,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=96,
        seq_length=LENGTH,
        image_start_token_id=tokenizer.image_start_token_id,
        vision_encoder=encoder,
    )
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer,
        QwenVLImageConverter(image_size=(28, 28)),
        sequence_length=LENGTH,
    )
    return QwenVLCausalLM(backbone, preprocessor=preprocessor)


def training_batch(image_start):
    """BATCH rows with one image span each; no loss on the span."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (BATCH, LENGTH)).astype("int32")
    span = [image_start] + [image_start + 2] * QUERIES + [image_start + 1]
    ids[:, 1 : 1 + len(span)] = span
    x = {
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "images": rng.standard_normal((BATCH, 1, 28, 28, 3)).astype("float32"),
    }
    weights = np.ones(ids.shape, "float32")
    weights[:, : 1 + len(span)] = 0.0
    return x, np.roll(ids, -1, axis=1), weights


def generation_inputs(image_start):
    """BATCH prompts of different lengths, half with an image, padded
    (`generate()` splits its batch over the data axis too)."""
    rng = np.random.default_rng(1)
    span = [image_start] + [image_start + 2] * QUERIES + [image_start + 1]
    ids = np.zeros((BATCH, LENGTH), "int32")
    mask = np.zeros((BATCH, LENGTH), "int32")
    for row in range(BATCH):
        words = list(rng.integers(0, 256, 2 + row % 3))
        prompt = [*words[:1], *span, *words[1:]] if row % 2 else words
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    images = rng.standard_normal((BATCH, 1, 28, 28, 3)).astype("float32")
    return {"token_ids": ids, "padding_mask": mask, "images": images}


def loss_and_gradients(model, batch, distribution=None):
    """Keras' loss of `fit()`, its gradients and the logits, as numpy."""
    x, y, w = batch
    if distribution is not None:
        # Inputs split over the data axis, as `fit()` places them.
        def place(a):
            layout = distribution.get_data_layout(a.shape).backend_layout
            return jax.device_put(a, layout)

        x, y, w = jax.tree_util.tree_map(place, (x, y, w))
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable):
        logits, _ = model.stateless_call(trainable, frozen, x)
        return LOSS(y, logits, sample_weight=w), logits

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, logits), grads = step(trainable)
    return float(loss), [np.asarray(g) for g in grads], np.asarray(logits)


def bare_generate(model, inputs):
    """Greedy token ids of a preprocessor-free copy of `model`."""
    bare = QwenVLCausalLM(model.backbone)
    bare.compile(sampler="greedy")
    return np.asarray(bare.generate(inputs, stop_token_ids=None)["token_ids"])


def specs(variables):
    """Each variable's sharding as JAX reports it, one entry per dim."""
    out = {}
    for v in variables:
        spec = list(v.value.sharding.spec)
        spec += [None] * (len(v.shape) - len(spec))
        out[v.path] = {
            "shape": list(v.shape),
            "spec": spec,
            "dtype": keras.backend.standardize_dtype(v.dtype),
        }
    return out


def slot_mismatches(optimizer):
    """Optimizer moments whose sharding differs from their weight's."""
    bad = []
    for variable, m, v in zip(
        optimizer._trainable_variables,
        optimizer._momentums,
        optimizer._velocities,
    ):
        want = variable.value.sharding
        for slot in (m, v):
            if not slot.value.sharding.is_equivalent_to(want, len(slot.shape)):
                bad.append(slot.path)
    return bad


def fit_one_step(model, batch, loss=LOSS, optimizer=None):
    """`fit()` for one step (AdamW by default); returns the reported loss.
    `loss="auto"` trains with the lm_head inside the loss."""
    optimizer = optimizer or keras.optimizers.AdamW(1e-3)
    model.compile(optimizer=optimizer, loss=loss)
    x, y, w = batch
    history = model.fit(
        x, y, sample_weight=w, batch_size=BATCH, epochs=1, verbose=0
    )
    return history.history["loss"][0]


def main(path):
    start = time.time()
    results = {"devices": len(jax.devices())}
    folder = tempfile.mkdtemp()
    reference = tiny_model(folder)
    preset = os.path.join(folder, "preset")
    reference.save_to_preset(preset)
    image_start = reference.backbone.image_start_token_id
    batch = training_batch(image_start)
    prompts = generation_inputs(image_start)
    loss, grads, logits = loss_and_gradients(reference, batch)
    tokens = bare_generate(reference, prompts)
    results["single"] = {"loss": loss}

    for mesh in MESHES:
        distribution = model_parallel(mesh)
        with distribution.scope():
            model = QwenVLCausalLM.from_preset(preset)
            mesh_loss, mesh_grads, mesh_logits = loss_and_gradients(
                model, batch, distribution
            )
            mesh_tokens = bare_generate(model, prompts)
        results["x".join(map(str, mesh))] = {
            "loss": mesh_loss,
            "gradient_max_abs_diff": max(
                float(np.max(np.abs(a - b))) for a, b in zip(grads, mesh_grads)
            ),
            "logits_max_abs_diff": float(np.max(np.abs(logits - mesh_logits))),
            "tokens_equal": bool(np.array_equal(tokens, mesh_tokens)),
            "has_preprocessor": model.preprocessor is not None,
            "specs": specs(model.backbone.weights),
        }

    # int8: quantized on one device and under a 2 x 4 mesh.
    quantized = QwenVLCausalLM.from_preset(preset)
    quantized.quantize("int8")
    int8_logits = np.asarray(quantized(batch[0]))
    int8_tokens = bare_generate(quantized, prompts)
    with model_parallel((2, 4)).scope():
        model = QwenVLCausalLM.from_preset(preset)
        model.quantize("int8")
        mesh_logits = np.asarray(model(batch[0]))
        results["int8"] = {
            "tokens_equal": bool(
                np.array_equal(int8_tokens, bare_generate(model, prompts))
            ),
            "logits_max_abs_diff": float(
                np.max(np.abs(int8_logits - mesh_logits))
            ),
            "specs": specs(model.backbone.weights),
        }

    fits = {}
    data_parallel = keras.distribution.DataParallel()
    with data_parallel.scope():
        fits["data_parallel"] = fit_one_step(
            QwenVLCausalLM.from_preset(preset), batch
        )
    with model_parallel((2, 4)).scope():
        model = QwenVLCausalLM.from_preset(preset)
        fits["model_parallel"] = fit_one_step(model, batch)
        fits["model_parallel_slot_mismatches"] = slot_mismatches(
            model.optimizer
        )
        # Plain SGD: the updates are the gradients themselves.
        stepped = {}
        for name, loss in (("sgd", LOSS), ("fused", "auto")):
            stepped[name] = QwenVLCausalLM.from_preset(preset)
            fits["model_parallel_" + name] = fit_one_step(
                stepped[name], batch, loss, keras.optimizers.SGD(1.0)
            )
        fits["fused_weight_max_abs_diff"] = max(
            float(np.max(np.abs(np.asarray(a.value) - np.asarray(b.value))))
            for a, b in zip(stepped["sgd"].weights, stepped["fused"].weights)
        )
    results["fit"] = fits
    results["seconds"] = time.time() - start
    with open(path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
