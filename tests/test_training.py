"""Training with `fit()`: the paper's stages, its optimiser, gradient
accumulation, LoRA and mixed precision, on the tiny random model.

Expected values come from the paper's recipe written out here (which part
trains in which stage, the learning rates of its table, the layer-decay
convention) and from hand-written AdamW arithmetic, or from PyTorch's own
`torch.optim.AdamW` where it is installed.
"""

import json
import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.training import QwenVLAdamW
from keras_qwenvl.training import enable_lora
from keras_qwenvl.training import merge_lora
from keras_qwenvl.training import recipe_optimizer
from keras_qwenvl.training import recipe_warmup_steps
from keras_qwenvl.training import set_stage
from keras_qwenvl.training import set_trainable
from keras_qwenvl.training import trainable_summary
from keras_qwenvl.training.stages import model_parts
from keras_qwenvl.training.stages import part_weights
from tests.test_model import span
from tests.test_model import tiny_backbone
from tests.test_model import tiny_encoder

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
VIT_DEPTH = 2  # ViT blocks of the tiny config
ALL_PARTS = {
    "vision_tower",
    "adapter",
    "vision_output",
    "decoder",
    "embeddings",
    "lm_head",
}
# Paper, training table (stage 3 as the original's "fix_vit": ln_post and
# proj stay frozen with the ViT).
STAGE_PARTS = {
    1: {"vision_tower", "adapter", "vision_output"},
    2: ALL_PARTS,
    3: {"adapter", "decoder", "embeddings", "lm_head"},
}
NO_DECAY_NAMES = {"bias", "gamma", "beta", "scale"}  # biases and norms


def part_of(path):
    """The part a weight belongs to, from its path alone."""
    head, _, rest = path.partition("/")
    if head == "token_embedding":
        return "embeddings" if rest == "embeddings" else "lm_head"
    if head.startswith("transformer_layer_") or head == "final_normalization":
        return "decoder"
    assert head.startswith("qwen_vl_vision_encoder"), path
    if rest.startswith("adapter/"):
        return "adapter"
    if rest.startswith(("ln_post/", "proj/")):
        return "vision_output"
    return "vision_tower"


def is_fixed(path):
    """The adapter's sin-cos table never trains."""
    return path.endswith("adapter/pos_embed")


def gets_no_gradient(path):
    """Key biases without rotary embedding (ViT, adapter): softmax ignores
    a constant added to all scores of a query."""
    return path.endswith("/key/bias") and part_of(path) != "decoder"


def layer_decay_multiplier(path, decay=0.95):
    """Block i of N gets decay**(N - i), the ViT stem decay**(N + 1)."""
    head, _, rest = path.partition("/")
    if head.startswith("qwen_vl_vision_encoder"):
        first = rest.split("/")[0]
        if first.startswith("vision_layer_"):
            return decay ** (VIT_DEPTH - int(first.rsplit("_", 1)[1]))
        if first in ("patch_embedding", "position_embedding", "ln_pre"):
            return decay ** (VIT_DEPTH + 1)
    return 1.0


def examples(n, seed=0, length=12):
    """n samples with one image span each; no loss on `<img>`..`</img>`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, (n, length)).astype("int32")
    ids[:, 1 : 1 + len(span())] = span()
    x = {
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "images": rng.standard_normal((n, 1, 28, 28, 3)).astype("float32"),
    }
    weights = np.ones(ids.shape, "float32")
    weights[:, : 1 + len(span())] = 0.0
    return x, np.roll(ids, -1, axis=1), weights


def fit(model, optimizer, data, batch_size=2, epochs=1):
    model.compile(optimizer=optimizer, loss=LOSS, weighted_metrics=[])
    x, y, w = data
    return model.fit(
        x,
        y,
        sample_weight=w,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )


@pytest.fixture(scope="module")
def shared_backbone():
    """One tiny backbone for tests that only read it or reset it first
    (building a model costs seconds on torch)."""
    return tiny_backbone()


@pytest.fixture
def backbone(shared_backbone):
    """The shared backbone with every part trainable (stage 2)."""
    set_stage(shared_backbone, 2)
    return shared_backbone


def snapshot(model):
    return {v.path: ops.convert_to_numpy(v).copy() for v in model.weights}


def to_np(x):
    return ops.convert_to_numpy(x)


# === Stages ===


def test_parts_cover_every_weight_once_and_switch_independently(backbone):
    model = backbone
    owners = {}
    for name, units in model_parts(model).items():
        for weight in (w for unit in units for w in part_weights(unit)):
            assert weight.path not in owners, weight.path
            owners[weight.path] = name
    assert owners == {v.path: part_of(v.path) for v in model.weights}

    def trainable_parts():
        return {part_of(v.path) for v in model.trainable_weights}

    set_trainable(model, **{name: False for name in ALL_PARTS})
    assert model.trainable_weights == []
    # Weight level: the token embedding trains, the untied lm_head not.
    set_trainable(model, embeddings=True)
    assert [v.path for v in model.trainable_weights] == [
        "token_embedding/embeddings"
    ]
    # None leaves parts as they are; the fixed table stays frozen.
    set_trainable(model, adapter=True)
    assert trainable_parts() == {"embeddings", "adapter"}
    assert not any(is_fixed(v.path) for v in model.trainable_weights)
    # A frozen model: parts left as None stay frozen.
    model.trainable = False
    set_trainable(model, decoder=True)
    assert trainable_parts() == {"decoder"}
    summary = trainable_summary(model)
    sizes = {}
    for v in model.weights:
        sizes[part_of(v.path)] = sizes.get(part_of(v.path), 0) + math.prod(
            v.shape
        )
    assert {k: s["total"] for k, s in summary.items()} == sizes
    assert summary["decoder"]["trainable"] == sizes["decoder"]
    assert summary["adapter"]["trainable"] == 0
    set_stage(model, 3)
    fixed = 4 * 32  # num_queries x output_dim of the sin-cos table
    assert trainable_summary(model)["adapter"]["trainable"] == (
        sizes["adapter"] - fixed
    )


def test_stage_errors_name_the_problem(backbone):
    with pytest.raises(ValueError, match="`stage` must be 1, 2 or 3"):
        set_stage(backbone, 4)
    with pytest.raises(TypeError, match="True, False or None"):
        set_trainable(backbone, decoder="yes")
    with pytest.raises(TypeError, match="QwenVLCausalLM.*QwenVLBackbone"):
        set_trainable(keras.layers.Dense(2), decoder=True)
    text_only = tiny_backbone(vision=False)
    with pytest.raises(ValueError, match="text-only"):
        set_stage(text_only, 2)
    with pytest.raises(ValueError, match="`adapter`.*no vision encoder"):
        set_trainable(text_only, adapter=True)
    set_trainable(text_only, adapter=False, decoder=True)  # nothing to freeze
    tied = tiny_backbone(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied"):
        set_trainable(tied, embeddings=True, lm_head=False)


def assert_fit_trained_exactly(model, optimizer, before, parts):
    """Weights of `parts` moved and have optimizer state; all others are
    bit-identical and have none."""
    after = snapshot(model)
    trained = {
        path for path in before if part_of(path) in parts and not is_fixed(path)
    }
    assert {v.path for v in model.trainable_weights} == trained
    for path in before:
        if path not in trained:
            np.testing.assert_array_equal(after[path], before[path], path)
        elif not gets_no_gradient(path):
            assert not np.array_equal(after[path], before[path]), path
    # Momentum and velocity exist only for trained weights.
    state = {v.name for v in optimizer.variables}
    state -= {"iteration", "learning_rate"}
    assert state == {
        f"{path.replace('/', '_')}_{slot}"
        for path in trained
        for slot in ("momentum", "velocity")
    }


# Stage 2 (everything trains) is fitted under mixed precision below.
@pytest.mark.parametrize("stage", [1, 3])
def test_stage_fit_changes_exactly_its_weights(stage):
    model = QwenVLCausalLM(tiny_backbone())
    set_stage(model, stage)
    before = snapshot(model)
    optimizer = recipe_optimizer(model, stage, total_steps=10, warmup_steps=0)
    fit(model, optimizer, examples(4))
    assert_fit_trained_exactly(model, optimizer, before, STAGE_PARTS[stage])


# === The optimiser ===


# One weight of each learning-rate multiplier and each kind of weight
# (eager optimizer steps compile per shape on JAX; a sample keeps it fast).
SAMPLE_WEIGHTS = (
    "vision_layer_0/mlp_fc/kernel",
    "vision_layer_0/attention/value/bias",
    "vision_layer_1/attention/query/kernel",
    "vision_layer_1/ln_1/gamma",
    "patch_embedding/kernel",
    "position_embedding",
    "ln_pre/beta",
    "adapter/query",
    "adapter/kv_proj/kernel",
    "ln_post/gamma",
    "/proj/kernel",
    "transformer_layer_0/attention/query/kernel",
    "transformer_layer_0/attention/query/bias",
    "transformer_layer_1/pre_mlp_norm/scale",
    "token_embedding/embeddings",
    "token_embedding/reverse_embeddings",
)


def sample_weights(model):
    variables = [
        v for v in model.trainable_variables if v.path.endswith(SAMPLE_WEIGHTS)
    ]
    assert len(variables) == len(SAMPLE_WEIGHTS)
    return variables


def test_layer_decay_is_a_per_weight_learning_rate(backbone):
    # Stage 2 of the paper's table: peak 5e-5, layer decay 0.95.
    optimizer = recipe_optimizer(backbone, 2, total_steps=100, warmup_steps=0)
    variables = sample_weights(backbone)
    rng = np.random.default_rng(0)
    # Small gradients: their global norm stays under the clip norm 1.0.
    grads = [
        (1e-3 * rng.standard_normal(v.shape)).astype("float32")
        for v in variables
    ]
    assert np.sqrt(sum(np.sum(g**2) for g in grads)) < 1.0
    before = [to_np(v).copy() for v in variables]
    optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)
    multipliers = set()
    for v, g, w in zip(variables, grads, before):
        lr = 5e-5 * layer_decay_multiplier(v.path)
        if v.name not in NO_DECAY_NAMES:
            w = w * (1 - lr * 0.05)
        # First AdamW step: m_hat = g, v_hat = g**2. Scaling the gradient
        # instead of the learning rate would leave this step unchanged.
        w = w - lr * g / (np.abs(g) + 1e-6)
        np.testing.assert_allclose(
            to_np(v), w, rtol=0, atol=2e-7, err_msg=v.path
        )
        multipliers.add(layer_decay_multiplier(v.path))
    assert multipliers == {0.95**3, 0.95**2, 0.95, 1.0}


def test_weight_decay_skips_norms_and_biases(backbone):
    optimizer = recipe_optimizer(
        backbone, 2, total_steps=10, warmup_steps=0, peak_learning_rate=0.1
    )
    variables = sample_weights(backbone)
    before = [to_np(v).copy() for v in variables]
    # Zero gradients: only the decoupled weight decay moves weights.
    optimizer.apply([ops.zeros(v.shape) for v in variables], variables)
    for v, w in zip(variables, before):
        if v.name in NO_DECAY_NAMES:
            np.testing.assert_array_equal(to_np(v), w, v.path)
        else:
            factor = 1 - 0.1 * layer_decay_multiplier(v.path) * 0.05
            np.testing.assert_allclose(to_np(v), w * factor, rtol=1e-6)
            assert not np.array_equal(to_np(v), w), v.path


def test_repeated_embedding_rows_get_their_summed_gradient():
    # TensorFlow hands embedding gradients over as slices, one per lookup.
    embedding = keras.layers.Embedding(10, 4)
    ids = keras.Input((4,), dtype="int32")
    model = keras.Model(ids, ops.sum(embedding(ids), axis=(1, 2)))
    before = to_np(embedding.embeddings).copy()
    optimizer = QwenVLAdamW(
        learning_rate=0.1, epsilon=1.0, weight_decay=0.0, global_clipnorm=None
    )
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.array([[1, 1, 1, 2]]), np.array([100.0]), verbose=0)
    # d(loss)/d(row) = 2 * (sum - 100) per lookup: row 1 is looked up 3 times.
    residual = 2 * (before[[1, 1, 1, 2]].sum() - 100)
    for row, count in ((1, 3), (2, 1)):
        g = count * residual
        # First AdamW step with eps = 1: lr * g / (|g| + 1).
        np.testing.assert_allclose(
            to_np(embedding.embeddings)[row],
            before[row] - 0.1 * g / (abs(g) + 1.0),
            rtol=1e-5,
        )


def test_steps_match_torch_adamw_with_groups_and_global_clip():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"block/kernel": (4, 3), "block/bias": (3,), "head/kernel": (5,)}
    values = {
        k: rng.standard_normal(s).astype("float32") for k, s in shapes.items()
    }
    # Gradient norms 10, 0.3, 5: steps 1 and 3 are clipped to norm 1.
    steps = []
    for norm in (10.0, 0.3, 5.0):
        g = {k: rng.standard_normal(s) for k, s in shapes.items()}
        total = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        steps.append(
            {k: (x * norm / total).astype("float32") for k, x in g.items()}
        )

    def keras_run(**kwargs):
        variables = []
        for path, value in values.items():
            scope, name = path.split("/")
            with keras.name_scope(scope):
                variables.append(keras.Variable(value, name=name))
        optimizer = QwenVLAdamW(
            learning_rate=0.01,
            learning_rate_multipliers=[("^block/", 0.5)],
            **kwargs,
        )
        for grads in steps:
            optimizer.apply(
                [ops.convert_to_tensor(grads[k]) for k in values], variables
            )
        return {path: to_np(v) for path, v in zip(values, variables)}

    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in values.items()}
    reference = torch.optim.AdamW(
        [
            {"params": [params["block/kernel"]], "lr": 0.005},
            {"params": [params["block/bias"]], "lr": 0.005, "weight_decay": 0},
            {"params": [params["head/kernel"]], "lr": 0.01},
        ],
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.05,
    )
    for grads in steps:
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        reference.step()
    expected = {k: p.detach().numpy() for k, p in params.items()}

    got = keras_run()
    unclipped = keras_run(global_clipnorm=None)
    for k in values:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6)
    assert not np.allclose(unclipped["block/kernel"], expected["block/kernel"])


def test_recipe_schedule_warmup_peak_cosine_and_end(backbone):
    model = backbone
    # Stage 1: peak 2e-4, min 1e-6, warm-up 500 of 50k steps, i.e. 10 of
    # a 1000-step run.
    optimizer = recipe_optimizer(model, 1, total_steps=1000)

    def lr_at(step):
        optimizer.iterations.assign(step)
        return float(to_np(optimizer.learning_rate))

    peak, low = 2e-4, 1e-6
    assert lr_at(0) == 0.0
    np.testing.assert_allclose(lr_at(4), peak * 4 / 10, rtol=1e-5)
    np.testing.assert_allclose(lr_at(10), peak, rtol=1e-5)
    # A third of the cosine: (1 + cos(pi / 3)) / 2 = 0.75 of the range.
    np.testing.assert_allclose(lr_at(340), low + 0.75 * (peak - low), rtol=1e-5)
    np.testing.assert_allclose(lr_at(1000), low, rtol=1e-4)
    np.testing.assert_allclose(lr_at(3000), low, rtol=1e-4)
    # Warm-up: the paper's steps, or its fraction of a shorter run.
    assert recipe_warmup_steps(1, 50_000) == 500
    assert recipe_warmup_steps(1, 200_000) == 500
    assert recipe_warmup_steps(2, 1900) == 40
    assert recipe_warmup_steps(3, 800) == 300
    assert recipe_warmup_steps(3, 2) == 1
    with pytest.raises(ValueError, match="`total_steps` must be a positive"):
        recipe_optimizer(model, 1, total_steps=0)
    with pytest.raises(ValueError, match="`warmup_steps` \\(10\\)"):
        recipe_optimizer(model, 1, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="`stage` must be 1, 2 or 3"):
        recipe_optimizer(model, 0, total_steps=10)
    with pytest.raises(ValueError, match="multipliers must be positive"):
        QwenVLAdamW(learning_rate_multipliers={"x": 0.0})


def test_recipe_optimizer_serializes(backbone):
    model = backbone
    optimizer = recipe_optimizer(
        model, 1, total_steps=100, gradient_accumulation_steps=4
    )
    config = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(json.loads(json.dumps(config)))
    assert isinstance(restored, QwenVLAdamW)
    assert restored.get_config() == optimizer.get_config()
    assert (restored.beta_2, restored.epsilon, restored.weight_decay) == (
        0.98,
        1e-6,
        0.05,
    )
    assert restored.global_clipnorm == 1.0
    for v in model.weights:
        assert restored.learning_rate_multiplier(v) == pytest.approx(
            layer_decay_multiplier(v.path)
        ), v.path


def test_gradient_accumulation_equals_one_big_batch():
    k = 2
    x, y, w = examples(4 * k, seed=1)
    # Text only: the mechanism does not depend on the model, and the
    # smaller graph compiles faster.
    text = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
    data = (text, y, w)

    def run(batch_size, **kwargs):
        model = QwenVLCausalLM(tiny_backbone(vision=False))
        initial = model.get_weights()
        # Update 0 has learning rate 0 (warm-up), update 1 the peak: a
        # schedule counted in micro-batches would differ. eps = 1 makes
        # the step depend on the gradient's scale (mean vs. sum).
        optimizer = recipe_optimizer(
            model,
            2,
            total_steps=2,
            warmup_steps=1,
            peak_learning_rate=1e-2,
            epsilon=1.0,
            **kwargs,
        )
        fit(model, optimizer, data, batch_size=batch_size)
        return initial, model.get_weights()

    initial, big = run(2 * k)
    _, accumulated = run(2, gradient_accumulation_steps=k)
    assert all(not np.allclose(a, b) for a, b in zip(big, initial))
    for got, expected in zip(accumulated, big):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# === LoRA ===


def lora_paths(num_layers=2):
    """Adapters on query/key/value/attention_output and w1/w2 only."""
    paths = set()
    for i in range(num_layers):
        layers = [
            "attention/query",
            "attention/key",
            "attention/value",
            "attention/attention_output",
            "feedforward_intermediate_dense",
            "feedforward_gate_dense",
        ]
        for layer in layers:
            for ab in "ab":
                paths.add(f"transformer_layer_{i}/{layer}/lora_kernel_{ab}")
    return paths


def test_lora_trains_only_adapters_merges_and_reloads(tmp_path):
    model = QwenVLCausalLM(tiny_backbone())
    plain_weights = len(model.weights)
    x, y, w = examples(4, seed=2)
    initial_logits = to_np(model(x))
    enable_lora(model, rank=4, alpha=8)
    assert {v.path for v in model.trainable_weights} == lora_paths()
    before = snapshot(model)
    fit(model, QwenVLAdamW(learning_rate=1e-2), (x, y, w))
    after = snapshot(model)
    for path in before:
        changed = not np.array_equal(after[path], before[path])
        assert changed == (path in lora_paths()), path

    lora_logits = to_np(model(x))
    assert not np.allclose(lora_logits, initial_logits, atol=1e-4)
    merge_lora(model)
    assert not any("lora" in v.path for v in model.weights)
    assert len(model.weights) == plain_weights
    merged_logits = to_np(model(x))
    np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5)

    model.backbone.save_to_preset(str(tmp_path))
    reloaded = QwenVLCausalLM(QwenVLBackbone.from_preset(str(tmp_path)))
    np.testing.assert_array_equal(to_np(reloaded(x)), merged_logits)

    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


def test_lora_defaults_options_and_errors(backbone):
    model = QwenVLCausalLM(tiny_backbone())
    enable_lora(model, train_embeddings=True)
    # Original finetune.py: rank 64, alpha 16.
    query = model.backbone.transformer_layers[0].attention.query
    assert (query.lora_rank, query.lora_alpha) == (64, 16)
    vit_block = model.backbone.vision_encoder.vision_layers[0]
    assert not vit_block.attention.query.lora_enabled
    trainable = {v.path for v in model.trainable_weights}
    assert trainable == lora_paths() | {"token_embedding/embeddings"}
    with pytest.raises(ValueError, match="already enabled"):
        enable_lora(model)
    with pytest.raises(ValueError, match=r"Unknown LoRA target.*\['c_attn'\]"):
        enable_lora(backbone, target_names=["c_attn"])
    with pytest.raises(ValueError, match="`rank` must be a positive"):
        enable_lora(backbone, rank=0)


# === Mixed precision ===


def test_mixed_bfloat16_fit_loss_falls_stage_2_trains_everything():
    policy = "mixed_bfloat16"
    backbone = tiny_backbone(
        dtype=policy, vision_encoder=tiny_encoder(dtype=policy)
    )
    model = QwenVLCausalLM(backbone)
    assert backbone.transformer_layers[0].compute_dtype == "bfloat16"
    assert backbone.vision_encoder.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.weights)
    set_stage(model, 2)
    before = snapshot(model)
    optimizer = recipe_optimizer(model, 2, total_steps=6, learning_rate=3e-3)
    history = fit(model, optimizer, examples(2, seed=3), epochs=6)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.2, losses
    assert_fit_trained_exactly(model, optimizer, before, STAGE_PARTS[2])


def test_train_on_batch_runs_the_compiled_step_without_tracing_again(
    tmp_path, monkeypatch
):
    """Every layer of the task is built, preprocessing layers included:
    Keras traces the whole model symbolically at each `train_on_batch` of a
    task with an unbuilt layer (its `_symbolic_build`), and that trace cost
    as much as a third of a small model's step."""
    from tests.test_model import tiny_causal_lm

    causal_lm = tiny_causal_lm(str(tmp_path))
    assert all(layer.built for layer in causal_lm._flatten_layers())
    causal_lm.compile(optimizer=keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(0)
    data = {
        "prompts": ["<img></img>What is it?", "<img></img>Colour?"],
        "responses": [" a cat", " red"],
        "images": [[rng.integers(0, 255, (28, 28, 3))] for _ in range(2)],
    }
    causal_lm.preprocessor.sequence_length = 24
    x, y, weights = causal_lm.preprocessor(data)
    causal_lm.train_on_batch(x, y, sample_weight=weights)  # compiles
    calls = []
    original = QwenVLCausalLM.call

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QwenVLCausalLM, "call", counted)
    for _ in range(2):
        causal_lm.train_on_batch(x, y, sample_weight=weights)
    # Compiled steps (JAX, TensorFlow) run without calling the model;
    # PyTorch runs it eagerly, once per step.
    eager = keras.backend.backend() == "torch"
    assert len(calls) == (2 if eager else 0)
