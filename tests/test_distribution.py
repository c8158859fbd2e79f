"""Sharding Qwen-VL with `keras.distribution`, and the memory arithmetic.

The multi-device tests run tests/distributed_checks.py once, in a
subprocess with 8 simulated CPU devices (JAX fixes its device count when it
starts), and assert on what it measured; `keras.distribution` exists for
JAX only, so they skip on the other backends. The layout-map checks and the
memory arithmetic run on every backend.
"""

import copy
import json
import math
import os
import re
import subprocess
import sys

import keras
import pytest

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.convert import convert_backbone_config
from keras_qwenvl.distribution import LAYOUT_RULES
from keras_qwenvl.distribution import check_layout_map
from keras_qwenvl.distribution import get_layout_map
from keras_qwenvl.distribution import memory_estimate
from keras_qwenvl.distribution import memory_table
from keras_qwenvl.distribution import model_parallel
from keras_qwenvl.distribution import parameter_counts
from keras_qwenvl.distribution import resolve_axes
from keras_qwenvl.presets import PUBLISHED_CONFIG
from keras_qwenvl.training import enable_lora
from keras_qwenvl.training import set_stage
from keras_qwenvl.training import trainable_summary
from tests.test_model import tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("8x1", "4x2", "2x4")
TOLERANCE = 1e-5
# The dimension of each kind of weight that is split over the model axis,
# by the end of its path; every other weight is replicated.
SHARDED_DIM = {
    "token_embedding/embeddings": 0,
    "token_embedding/reverse_embeddings": 1,
    "query/kernel": 1,
    "key/kernel": 1,
    "value/kernel": 1,
    "query/bias": 0,
    "key/bias": 0,
    "value/bias": 0,
    "attention_output/kernel": 0,
    "feedforward_intermediate_dense/kernel": 1,
    "feedforward_gate_dense/kernel": 1,
    "feedforward_output_dense/kernel": 0,
    "mlp_fc/kernel": 1,
    "mlp_fc/bias": 0,
    "mlp_proj/kernel": 0,
    # int8 scales (`quantize("int8")`)
    "token_embedding/embeddings_scale": 0,
    "token_embedding/reverse_embeddings_scale": 0,
    "query/kernel_scale": 2,
    "key/kernel_scale": 2,
    "value/kernel_scale": 2,
    "feedforward_intermediate_dense/kernel_scale": 0,
    "feedforward_gate_dense/kernel_scale": 0,
    "mlp_fc/kernel_scale": 0,
}


def cpu_mesh(shape):
    """A (batch, model) mesh of named CPU devices; needs no backend."""
    devices = [f"cpu:{i}" for i in range(math.prod(shape))]
    return keras.distribution.DeviceMesh(shape, ("batch", "model"), devices)


def expected_spec(path, shape, model_size, dtype="float32"):
    """What the rules mean for one weight, written out independently."""
    spec = [None] * len(shape)
    ending = "/".join(path.split("/")[-2:])
    dim = SHARDED_DIM.get(ending)
    if ending == "token_embedding/reverse_embeddings" and dtype == "int8":
        dim = 0  # the int8 lm_head's table is kept (vocabulary, hidden)
    if dim is not None and shape[dim] % model_size == 0:
        spec[dim] = "model"
    return spec


# === Multi-device checks (JAX, 8 simulated devices, one subprocess) ===


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if keras.config.backend() != "jax":
        pytest.skip(
            "keras.distribution (DataParallel, ModelParallel) is implemented "
            "for the JAX backend only"
        )
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "")
            + " --xla_force_host_platform_device_count=8"
        ).strip(),
        PYTHONPATH=os.pathsep.join(
            [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )
    script = os.path.join(REPO, "tests", "distributed_checks.py")
    run = subprocess.run(
        [sys.executable, script, str(out)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode:
        pytest.fail(f"distributed_checks.py failed:\n{run.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


def test_runs_on_eight_devices(measured):
    assert measured["devices"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_training_step_equals_single_device(measured, mesh):
    result = measured[mesh]
    assert abs(result["loss"] - measured["single"]["loss"]) <= TOLERANCE
    assert result["gradient_max_abs_diff"] <= TOLERANCE


@pytest.mark.parametrize("mesh", MESHES)
def test_weights_are_sharded_as_their_rules_say(measured, mesh):
    model_size = int(mesh.split("x")[1])
    specs = measured[mesh]["specs"]
    for path, entry in specs.items():
        assert entry["spec"] == expected_spec(
            path, entry["shape"], model_size
        ), path
    split = [p for p, e in specs.items() if "model" in e["spec"]]
    assert len(split) >= len(SHARDED_DIM) - 8  # sharding really happened


def test_int8_model_under_model_parallel(measured):
    """Quantized under a 2 x 4 mesh, a model generates the single-device
    int8 model's tokens and logits, its int8 weights and scales laid out
    as the rules say: the untied lm_head's table, kept by vocabulary
    rows, split over the vocabulary."""
    result = measured["int8"]
    assert result["tokens_equal"]
    assert result["logits_max_abs_diff"] <= TOLERANCE
    specs = result["specs"]
    for path, entry in specs.items():
        assert entry["spec"] == expected_spec(
            path, entry["shape"], 4, entry["dtype"]
        ), path
    table = specs["token_embedding/reverse_embeddings"]
    assert table["dtype"] == "int8"
    assert table["spec"] == ["model", None]
    scales = [p for p, e in specs.items() if p.endswith("_scale")]
    assert any("model" in specs[p]["spec"] for p in scales)


def test_undivisible_dimension_falls_back_to_replication(measured):
    """The tiny ViT's MLP has 42 units: split 2 ways, replicated 4 ways."""
    for mesh, want in (("4x2", "model"), ("2x4", None)):
        entries = [
            e
            for p, e in measured[mesh]["specs"].items()
            if p.endswith("mlp_fc/kernel")
        ]
        assert entries and all(e["shape"][1] == 42 for e in entries)
        assert all(e["spec"] == [None, want] for e in entries)


@pytest.mark.parametrize("mesh", MESHES)
def test_preset_reloaded_under_distribution_generates_the_same(measured, mesh):
    result = measured[mesh]
    assert result["has_preprocessor"]
    assert result["logits_max_abs_diff"] <= TOLERANCE
    assert result["tokens_equal"]


def test_fit_runs_under_data_and_model_parallel(measured):
    fit = measured["fit"]
    names = ("data_parallel", "model_parallel", "model_parallel_sgd",
             "model_parallel_fused")
    for name in names:
        assert abs(fit[name] - measured["single"]["loss"]) <= TOLERANCE
    assert fit["model_parallel_slot_mismatches"] == []
    # The lm_head inside the loss (compile's defaults) updates the sharded
    # weights as the step on the logits does.
    assert fit["fused_weight_max_abs_diff"] <= TOLERANCE


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="runs once per CI, in the jax pass (the script itself picks JAX)",
)
def test_example_script_trains_on_a_simulated_mesh():
    """examples/train_distributed.py as a user runs it: no KERAS_BACKEND
    (it picks JAX) and no XLA_FLAGS (`--simulate-cpu-devices` sets them)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_BACKEND", "XLA_FLAGS")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    script = os.path.join(REPO, "examples", "train_distributed.py")
    run = subprocess.run(
        [sys.executable, script, "--config", "tiny", "--mesh", "4,2"]
        + ["--simulate-cpu-devices", "8", "--steps", "2", "--batch-size", "4"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-6000:]
    summary = json.loads(run.stdout[run.stdout.rindex('{\n  "mesh"') :])
    assert summary["mesh"] == {"data": 4, "model": 2}
    assert summary["distribution"] == "QwenVLModelParallel"
    assert len(summary["loss"]) == 1 and math.isfinite(summary["loss"][0])
    # The model axis splits the weights: a device holds less than all.
    assert summary["weight_bytes_per_device"] < summary["weight_bytes_total"]


# === Layout map (every backend) ===


def test_rules_cover_every_weight_of_every_variant():
    layout_map = get_layout_map(cpu_mesh((2, 4)))
    lora = tiny_backbone()
    enable_lora(lora, rank=2)
    quantized = tiny_backbone()
    QwenVLCausalLM(quantized).quantize("int8")
    variants = [
        tiny_backbone(),
        tiny_backbone(vision=False),
        tiny_backbone(vision=False, tie_word_embeddings=True),
        lora,
        quantized,
    ]
    used = set()
    for model in variants:
        layouts = check_layout_map(layout_map, model)
        assert set(layouts) == {w.path for w in model.weights}
        for weight in model.weights:
            if "lora_kernel" in weight.path:
                assert layouts[weight.path] == (None,) * len(weight.shape)
            else:
                dtype = keras.backend.standardize_dtype(weight.dtype)
                want = expected_spec(weight.path, weight.shape, 4, dtype)
                assert list(layouts[weight.path]) == want, weight.path
            used |= {
                pattern
                for pattern, _ in LAYOUT_RULES
                if re.fullmatch(pattern, weight.path)
            }
    assert used == {pattern for pattern, _ in LAYOUT_RULES}  # no dead rule


def test_check_fails_loudly_on_a_weight_no_rule_covers():
    layout_map = get_layout_map(cpu_mesh((4, 2)))
    del layout_map["(?:.*/)?mlp_fc/kernel"]
    with pytest.raises(ValueError, match=r"vision_layer_0/mlp_fc/kernel"):
        check_layout_map(layout_map, tiny_backbone())
    with pytest.raises(ValueError, match="2 weight\\(s\\) .* match no rule"):
        check_layout_map(layout_map, tiny_backbone())


def test_model_parallel_checks_the_rules_before_any_model_is_built():
    mesh = cpu_mesh((4, 2))
    distribution = model_parallel(mesh)  # checked on a reference model
    assert isinstance(distribution, keras.distribution.ModelParallel)
    assert distribution.batch_dim_name == "batch"
    backbone = tiny_backbone()
    head = keras.layers.Dense(2, name="score_head")
    extended = keras.Model(backbone.input, head(backbone(backbone.input)))
    with pytest.raises(
        ValueError, match=r"2 weight\(s\).*: score_head/kernel \(32, 2\), "
    ):
        model_parallel(mesh, model=extended)


def test_each_variable_layout_is_resolved_from_its_shape():
    backbone = tiny_backbone()  # 2 heads, MLP of 40, vocabulary 300
    for shape, model_size in (((8, 1), 1), ((4, 2), 2), ((2, 4), 4)):
        distribution = model_parallel(cpu_mesh(shape), model=backbone)
        for weight in backbone.weights:
            layout = distribution.get_variable_layout(weight)
            assert layout.device_mesh is distribution.device_mesh
            want = expected_spec(weight.path, weight.shape, model_size)
            assert list(layout.axes) == want, weight.path


def test_resolve_axes_replicates_what_the_axis_does_not_divide():
    mesh = cpu_mesh((2, 4))
    assert resolve_axes((None, "model"), (8, 12), mesh) == (None, "model")
    assert resolve_axes((None, "model"), (8, 6), mesh) == (None, None)
    assert resolve_axes(("batch", None), (6, 3), mesh) == ("batch", None)
    assert resolve_axes((), (3, 5, 7), mesh) == (None, None, None)
    with pytest.raises(ValueError, match="has 2 axes .* shape \\(4,\\)"):
        resolve_axes((None, "model"), (4,), mesh, path="x/kernel")


def test_layout_map_arguments_are_checked():
    mesh = cpu_mesh((2, 4))
    layout_map = QwenVLBackbone.get_layout_map(mesh)
    assert list(layout_map) == [pattern for pattern, _ in LAYOUT_RULES]
    renamed = QwenVLBackbone.get_layout_map(
        keras.distribution.DeviceMesh(
            (2, 4), ("data", "heads"), [f"cpu:{i}" for i in range(8)]
        ),
        model_parallel_dim_name="heads",
        data_parallel_dim_name="data",
    )
    assert renamed["token_embedding/embeddings"].axes == ("heads", None)
    with pytest.raises(TypeError, match="must be a `keras.distribution"):
        get_layout_map((2, 4))
    with pytest.raises(ValueError, match="'tensor' is not an axis"):
        get_layout_map(mesh, model_parallel_dim_name="tensor")
    with pytest.raises(ValueError, match="'data' is not an axis"):
        get_layout_map(mesh, data_parallel_dim_name="data")


# === Memory arithmetic (every backend) ===

W, WM, H, FF, V = 1664, 8192, 4096, 11008, 151936  # published sizes
VIT_BLOCK = (
    4 * W + (3 * W * W + 3 * W) + (W * W + W) + (W * WM + WM) + (WM * W + W)
)
PUBLISHED_PARTS = {
    "vision_tower": W * 3 * 14 * 14 + 256 * W + 2 * W + 48 * VIT_BLOCK,
    "adapter": 2 * 256 * H + H * W + (4 * H * H + 4 * H) + 4 * H,
    "vision_output": 2 * H + H * H,
    "decoder": 32 * (2 * H + 3 * H * H + 3 * H + H * H + 3 * H * FF) + H,
    "embeddings": V * H,
    "lm_head": V * H,
}
POS_EMBED = 256 * H  # the adapter's fixed sin-cos table


def test_published_parameter_counts_by_hand():
    counts = parameter_counts(PUBLISHED_CONFIG, stage=2)
    assert {k: v["total"] for k, v in counts.items()} == PUBLISHED_PARTS
    assert sum(PUBLISHED_PARTS.values()) == 9_656_935_168
    adapter = counts["adapter"]
    assert adapter["trainable"] == PUBLISHED_PARTS["adapter"] - POS_EMBED


def tiny_config():
    config = copy.deepcopy(PUBLISHED_CONFIG)
    config.update(
        vocab_size=64,
        hidden_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        kv_channels=64,
        intermediate_size=2 * 96,
        seq_length=16,
    )
    config["visual"].update(
        image_size=28,
        patch_size=14,
        width=16,
        layers=2,
        heads=2,
        mlp_ratio=2.0,
        output_dim=128,
        n_queries=4,
        image_start_id=60,
    )
    return config


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_parameter_counts_equal_the_built_model(stage):
    config = tiny_config()
    backbone = QwenVLBackbone(**convert_backbone_config(config))
    set_stage(backbone, stage)
    assert parameter_counts(config, stage) == trainable_summary(backbone)


def test_memory_estimate_by_hand():
    # Stage 3, mixed_bfloat16 on 8 devices: float32 weights, gradients and
    # AdamW moments of the adapter (less its fixed table) and the LLM.
    total = sum(PUBLISHED_PARTS.values())
    trainable = (
        PUBLISHED_PARTS["adapter"]
        - POS_EMBED
        + PUBLISHED_PARTS["decoder"]
        + 2 * V * H
    )
    e = memory_estimate(PUBLISHED_CONFIG, 3, devices=8)
    assert e["parameters"] == total and e["trainable"] == trainable
    assert e["weights"] == total * 4 / 8
    assert e["gradients"] == trainable * 4 / 8
    assert e["optimizer"] == trainable * 8 / 8
    assert e["state"] == (total * 4 + trainable * 12) / 8
    # bf16 activations of a 2048-token sample with one 448 image, decoder
    # rematerialised: block inputs, one block, logits, adapter; no ViT.
    s, patches, queries = 2048, 32 * 32, 256
    block = s * ((8 * H + 4 * FF) * 2 + 32 * s * 6)
    adapter = (4 * patches + 3 * queries) * H * 2 + 32 * queries * patches * 6
    activations = 32 * s * H * 2 + block + s * V * 8 + adapter
    assert e["activations_per_sample"] == activations
    assert e["max_batch_size"] == int((80e9 - e["state"]) // activations)

    # Stage 1 trains the ViT: its activations at 224 (256 patches) count.
    e1 = memory_estimate(
        PUBLISHED_CONFIG,
        1,
        precision="float32",
        remat=False,
        images_per_sample=2,
        gradient_accumulation=True,
    )
    vit = 48 * 256 * ((8 * W + 2 * WM) * 4 + 16 * 256 * 8)
    adapter = (4 * 256 + 3 * queries) * H * 4 + 32 * queries * 256 * 8
    decoder = 32 * 512 * ((8 * H + 4 * FF) * 4 + 32 * 512 * 8)
    logits = 512 * V * 12
    assert e1["activations_per_sample"] == decoder + logits + 2 * (
        vit + adapter
    )
    vision = sum(
        PUBLISHED_PARTS[p] for p in ("vision_tower", "adapter", "vision_output")
    )
    assert e1["accumulators"] == (vision - POS_EMBED) * 4
    # Rematerialised, the ViT keeps its blocks' inputs and one block.
    e1_remat = memory_estimate(
        PUBLISHED_CONFIG,
        1,
        precision="float32",
        remat=False,
        images_per_sample=2,
        gradient_accumulation=True,
        vision_remat=True,
    )
    vit_remat = 48 * 256 * W * 4 + vit // 48
    assert e1_remat["activations_per_sample"] == decoder + logits + 2 * (
        vit_remat + adapter
    )
    assert e1_remat["max_batch_size"] > e1["max_batch_size"]
    # Stage 2 in float32 does not fit one 80 GB card at all.
    e2 = memory_estimate(PUBLISHED_CONFIG, 2, precision="float32")
    assert e2["state"] > 80e9 and e2["max_batch_size"] == 0


def test_memory_table_rows_and_errors():
    table = memory_table().splitlines()
    assert len(table) == 2 + 3 * 3 * 3
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[:3] == ["1", "float32", "1"]
    first = memory_estimate(PUBLISHED_CONFIG, 1, 1, "float32")
    assert cells[6] == f"{first['state'] / 1e9:.1f}"
    assert cells[8] == str(first["max_batch_size"])
    with pytest.raises(ValueError, match="`precision` must be one of"):
        memory_estimate(PUBLISHED_CONFIG, 2, precision="float16")
    with pytest.raises(ValueError, match="`stage` must be 1, 2 or 3"):
        memory_estimate(PUBLISHED_CONFIG, 4)
    with pytest.raises(ValueError, match="`devices` must be at least 1"):
        memory_estimate(PUBLISHED_CONFIG, 2, devices=0)
