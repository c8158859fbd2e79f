"""Qwen-VL on several devices with `keras.distribution`, and the memory it
needs.

Backends: Keras 3 implements `keras.distribution` (`DeviceMesh`,
`LayoutMap`, `DataParallel`, `ModelParallel`) for JAX only; on PyTorch and
TensorFlow the layout map is plain data that nothing applies. See the README
for what users of those backends do instead.

Sharding rules: `LAYOUT_RULES` names every weight of the vision encoder,
the adapter and the decoder by a regular expression on its `variable.path`
and says which dimension is split over the mesh's model axis: attention
heads, MLP hidden units and the vocabulary. Every other dimension, and
every weight whose rule says `()`, is replicated. A model quantized with
`quantize("int8")` is covered too: its scales are split as their
kernels' outputs, and the untied lm_head's int8 table, kept by vocabulary
rows, stays split over the vocabulary.

Two guarantees on top of a plain `keras.distribution.LayoutMap`:
- `check_layout_map` raises a `ValueError` naming every weight of a model
  that no rule covers (`LayoutMap` would silently replicate it), and
  `model_parallel` runs that check before it returns a distribution.
- `QwenVLModelParallel` resolves the layout of each variable from its
  shape when the variable is created: a dimension its rule shards but that
  the model axis does not divide (JAX cannot split 16 heads over 64
  devices) is replicated instead, for that weight only. The same layout
  then serves the optimizer's slots, which copy their weight's layout.

Memory: `parameter_counts` splits a Qwen-VL config into the six parts of
`keras_qwenvl.training.stages`, and `memory_estimate` turns it into bytes
per device for a training stage, a precision and a device count;
`memory_table` writes the README's table.

Example:
```python
# 8 accelerators: 2-way data parallel x 4-way model parallel.
distribution = model_parallel((2, 4))
with distribution.scope():
    model = QwenVLCausalLM.from_preset("/data/Qwen-VL")
```
"""

import contextlib
import math
import re

import keras

from keras_qwenvl.training.stages import PARTS
from keras_qwenvl.training.stages import STAGES

# In `LAYOUT_RULES`, the dimension split over the mesh's model axis.
MODEL = "model"
_ANY = r"(?:.*/)?"  # any prefix of layer names (the encoder's own name)

# `(pattern, axes)` pairs: `pattern` is `re.fullmatch`ed against
# `variable.path`; `axes` has one entry per dimension, MODEL where the
# weight is split over the model axis and None where it is not; `()`
# replicates a weight of any rank. No two patterns match the same path.
LAYOUT_RULES = (
    # Token embedding (vocabulary, hidden); untied lm_head (hidden,
    # vocabulary).
    (_ANY + "token_embedding/embeddings", (MODEL, None)),
    (_ANY + "token_embedding/reverse_embeddings", (None, MODEL)),
    # Attention of the decoder blocks, the ViT blocks and the adapter:
    # query/key/value kernels (hidden, heads, head_dim), their biases
    # (heads, head_dim), output kernels (heads, head_dim, hidden).
    (_ANY + "attention/(query|key|value)/kernel", (None, MODEL, None)),
    (_ANY + "attention/(query|key|value)/bias", (MODEL, None)),
    (_ANY + "attention/attention_output/kernel", (MODEL, None, None)),
    (_ANY + "attention/attention_output/bias", ()),
    # Decoder MLP: w1 and w2 (hidden, intermediate), c_proj (intermediate,
    # hidden).
    (_ANY + "feedforward_(intermediate|gate)_dense/kernel", (None, MODEL)),
    (_ANY + "feedforward_output_dense/kernel", (MODEL, None)),
    # ViT MLP: c_fc (width, intermediate) with its bias, c_proj back.
    (_ANY + "mlp_fc/kernel", (None, MODEL)),
    (_ANY + "mlp_fc/bias", (MODEL,)),
    (_ANY + "mlp_proj/kernel", (MODEL, None)),
    (_ANY + "mlp_proj/bias", ()),
    # Norms: decoder RMSNorms; ViT, adapter and output LayerNorms.
    (_ANY + "(pre_attention_norm|pre_mlp_norm|final_normalization)/scale", ()),
    (_ANY + "(ln_pre|ln_1|ln_2|ln_q|ln_kv|ln_post)/(gamma|beta)", ()),
    # ViT stem: patch conv and the learned 16x16 position table.
    (_ANY + "patch_embedding/kernel", ()),
    (_ANY + "position_embedding", ()),
    # Adapter: learned queries, fixed sin-cos table, kv projection; the
    # output projection after `ln_post`.
    (_ANY + "adapter/(query|pos_embed)", ()),
    (_ANY + "adapter/kv_proj/kernel", ()),
    (_ANY + "proj/kernel", ()),
    # LoRA adapters (`keras_qwenvl.training.enable_lora`): small, replicated.
    (_ANY + "lora_kernel_(a|b)", ()),
    # int8 scales (`quantize("int8")`), split as their kernels' output
    # dimension: one per vocabulary row of either table; (1, 1, heads,
    # head_dim) for query/key/value, (1, 1, hidden) after attention;
    # (units,) for Dense layers.
    (_ANY + "token_embedding/(embeddings|reverse_embeddings)_scale",
     (MODEL,)),
    (_ANY + "attention/(query|key|value)/kernel_scale",
     (None, None, MODEL, None)),
    (_ANY + "attention/attention_output/kernel_scale", ()),
    (_ANY + "(feedforward_(intermediate|gate)_dense|mlp_fc)/kernel_scale",
     (MODEL,)),
    (_ANY + "(feedforward_output_dense|mlp_proj)/kernel_scale", ()),
    (_ANY + "(adapter/kv_proj|proj)/kernel_scale", ()),
)

# Weights that `quantize("int8")` stores transposed, whose rule's axes
# apply reversed to their int8 version: the untied lm_head's table, kept
# by vocabulary rows, (vocabulary, hidden) (`QwenVLTokenEmbedding`), so
# that it stays split over the vocabulary.
TRANSPOSED_WHEN_INT8 = (_ANY + "token_embedding/reverse_embeddings",)


def rule_axes(layout_map, variable):
    """The axes of `layout_map`'s rule for `variable` (before
    `resolve_axes`), or None where no rule matches it."""
    layout = layout_map[variable.path]
    if layout is None:
        return None
    axes = tuple(layout.axes)
    if keras.backend.standardize_dtype(variable.dtype) == "int8" and any(
        re.fullmatch(pattern, variable.path)
        for pattern in TRANSPOSED_WHEN_INT8
    ):
        axes = axes[::-1]
    return axes


def get_layout_map(
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `keras.distribution.LayoutMap` of `LAYOUT_RULES` on `device_mesh`.

    Attention heads, MLP hidden units and the vocabulary are split over
    `model_parallel_dim_name`; all other dimensions are replicated. The
    data axis is not used by any weight (inputs are split over it by the
    distribution).

    Use it with `QwenVLModelParallel` (or `model_parallel`, which also
    checks it), which replicates a dimension that the model axis does not
    divide; a plain `keras.distribution.ModelParallel` would fail on it.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: the mesh axis that weights are split over.
        data_parallel_dim_name: the mesh axis that batches are split over.

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), keras.distribution.list_devices()
    )
    layout_map = QwenVLBackbone.get_layout_map(mesh)
    distribution = QwenVLModelParallel(layout_map=layout_map)
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`, got "
            f"{type(device_mesh).__name__}."
        )
    for role, name in (
        ("model_parallel_dim_name", model_parallel_dim_name),
        ("data_parallel_dim_name", data_parallel_dim_name),
    ):
        if name not in device_mesh.axis_names:
            raise ValueError(
                f"`{role}` {name!r} is not an axis of the device mesh; its "
                f"axes are {list(device_mesh.axis_names)}."
            )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in LAYOUT_RULES:
        layout_map[pattern] = tuple(
            model_parallel_dim_name if axis == MODEL else None for axis in axes
        )
    return layout_map


def resolve_axes(axes, shape, device_mesh, path=None):
    """The axes of a weight of `shape` under a rule's `axes`.

    `()` gives one None per dimension. A dimension that its mesh axis does
    not divide is replicated (None) instead of split.

    Args:
        axes: the rule's axes (a `TensorLayout`'s `axes`).
        shape: the weight's shape.
        device_mesh: the `keras.distribution.DeviceMesh`.
        path: the weight's path, for the error message.

    Returns:
        A tuple with one mesh axis name or None per dimension.
    """
    axes, shape = tuple(axes), tuple(shape)
    if not axes:
        return (None,) * len(shape)
    if len(axes) != len(shape):
        raise ValueError(
            f"The layout rule for {path or 'a weight'} has {len(axes)} axes "
            f"{axes}, but the weight has shape {shape}."
        )
    sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    return tuple(
        None if axis is not None and dim % sizes[axis] else axis
        for axis, dim in zip(axes, shape)
    )


class QwenVLModelParallel(keras.distribution.ModelParallel):
    """`keras.distribution.ModelParallel` whose layouts fit each shape.

    Each variable takes the layout of the rule matching its path (see
    `get_layout_map`), with `resolve_axes` applied to its shape: a
    dimension the rule splits over an axis that does not divide it is
    replicated for that variable. Variables matching no rule (optimizer
    step counters, seed generator states) are replicated, as in
    `ModelParallel`. A weight that `quantize("int8")` stores transposed
    (the untied lm_head's table, `TRANSPOSED_WHEN_INT8`) takes its rule's
    axes reversed. JAX only, like `keras.distribution`.

    Args:
        layout_map: a `keras.distribution.LayoutMap`, e.g. from
            `get_layout_map`.
        batch_dim_name: the mesh axis that batches are split over (defaults
            to the mesh's first axis).
        auto_shard_dataset: as for `keras.distribution.ModelParallel`.
    """

    @property
    def layout_map(self):
        return self._layout_map

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is not None:
            return variable._layout
        axes = rule_axes(self._layout_map, variable)
        return keras.distribution.TensorLayout(
            resolve_axes(
                axes or (), variable.shape, self.device_mesh, variable.path
            ),
            self.device_mesh,
        )


def check_layout_map(layout_map, model):
    """Check that a rule of `layout_map` covers every weight of `model`.

    Args:
        layout_map: a `keras.distribution.LayoutMap` with a device mesh.
        model: a Keras model or layer, e.g. a `QwenVLCausalLM` or
            `QwenVLBackbone`.

    Returns:
        A dict from each weight's path to its resolved axes (see
        `resolve_axes`).

    Raises:
        ValueError: naming the weights that no rule matches (a plain
            `LayoutMap` would replicate them on every device) or whose
            rule does not fit their rank.
    """
    layouts, uncovered = {}, []
    for weight in model.weights:
        axes = rule_axes(layout_map, weight)
        if axes is None:
            uncovered.append(f"{weight.path} {tuple(weight.shape)}")
            continue
        layouts[weight.path] = resolve_axes(
            axes, weight.shape, layout_map.device_mesh, weight.path
        )
    if uncovered:
        raise ValueError(
            f"{len(uncovered)} weight(s) of {model.name} match no rule of "
            "the layout map and would be replicated on every device: "
            + ", ".join(uncovered)
            + ". Add rules for them (keras_qwenvl.distribution.LAYOUT_RULES)."
        )
    return layouts


@contextlib.contextmanager
def _no_distribution():
    """Build variables as if no distribution were set."""
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


def _reference_backbone():
    """A small Qwen-VL with every kind of weight of the published one
    (vision encoder, adapter, untied lm_head), built on no mesh."""
    from keras_qwenvl.backbone import QwenVLBackbone
    from keras_qwenvl.vision_encoder import QwenVLVisionEncoder

    with _no_distribution():
        encoder = QwenVLVisionEncoder(
            image_size=28,
            patch_size=14,
            width=8,
            num_layers=1,
            num_heads=2,
            intermediate_dim=8,
            output_dim=8,
            num_queries=4,
            adapter_head_dim=4,
        )
        return QwenVLBackbone(
            vocabulary_size=8,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=8,
            vision_encoder=encoder,
        )


def model_parallel(
    device_mesh,
    model=None,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
    auto_shard_dataset=True,
):
    """A checked `QwenVLModelParallel` for Qwen-VL on `device_mesh`.

    The layout map of `get_layout_map` is checked (`check_layout_map`)
    against `model`, or, by default, against a small model of the same
    architecture built here: weight names do not depend on sizes, so a
    renamed weight fails here before a large model is built and silently
    replicated. Create the model under the returned distribution's
    `scope()` (or after `keras.distribution.set_distribution`).

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`, or a mesh shape
            `(data, model)` over `keras.distribution.list_devices()` with
            the two axis names below.
        model: optional model whose weights the rules must cover (e.g. one
            with LoRA enabled); defaults to the small reference model.
        model_parallel_dim_name: the mesh axis weights are split over.
        data_parallel_dim_name: the mesh axis batches are split over.
        auto_shard_dataset: as for `keras.distribution.ModelParallel`.

    Returns:
        A `QwenVLModelParallel` (a `keras.distribution.ModelParallel`).

    Example:
    ```python
    distribution = model_parallel((2, 4))  # 8 devices
    with distribution.scope():
        model = QwenVLCausalLM.from_preset("qwen_vl_7b", load_weights=False)
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        shape = tuple(device_mesh)
        if len(shape) != 2:
            raise ValueError(
                f"A mesh shape must be (data, model), e.g. (2, 4); got {shape}."
            )
        device_mesh = keras.distribution.DeviceMesh(
            shape,
            (data_parallel_dim_name, model_parallel_dim_name),
            keras.distribution.list_devices(),
        )
    layout_map = get_layout_map(
        device_mesh, model_parallel_dim_name, data_parallel_dim_name
    )
    check_layout_map(
        layout_map, _reference_backbone() if model is None else model
    )
    return QwenVLModelParallel(
        layout_map=layout_map,
        batch_dim_name=data_parallel_dim_name,
        auto_shard_dataset=auto_shard_dataset,
    )


# === Memory arithmetic ===

# Bytes per parameter: (weight, gradient, AdamW moments m and v, activation
# value). Keras keeps the variables, and so the gradients and the optimizer
# slots made from them, in the policy's variable dtype (float32 under
# mixed_bfloat16) and computes in its compute dtype.
PRECISION_BYTES = {
    "float32": (4, 4, 8, 4),
    "bfloat16": (2, 2, 4, 2),
    "mixed_bfloat16": (4, 4, 8, 2),
}
# Paper, training table: (image size, sequence length) of each stage.
STAGE_SHAPES = {1: (224, 512), 2: (448, 2048), 3: (448, 2048)}
# The adapter's head width in the published model (`QwenVLAdapter`).
ADAPTER_HEAD_DIM = 128
# The adapter's sin-cos table never trains (checkpoint name).
FIXED_WEIGHTS = ("transformer.visual.attn_pool.pos_embed",)


def _part_of(name):
    """The part (see `keras_qwenvl.training.stages`) of a checkpoint
    tensor name."""
    if name.startswith("transformer.wte."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("transformer.visual.attn_pool."):
        return "adapter"
    if name.startswith(
        ("transformer.visual.ln_post.", "transformer.visual.proj")
    ):
        return "vision_output"
    if name.startswith("transformer.visual."):
        return "vision_tower"
    return "decoder"


def parameter_counts(config, stage=2):
    """Parameters per part of a Qwen-VL config, and how many train.

    Counted from `keras_qwenvl.convert.checkpoint_layout`, in the format of
    `keras_qwenvl.training.trainable_summary` after `set_stage(stage)`.

    Args:
        config: a Hugging Face Qwen-VL `config.json` as a dict, e.g.
            `keras_qwenvl.presets.PUBLISHED_CONFIG`.
        stage: 1, 2 or 3 (the paper's stages), or None for nothing trained.

    Returns:
        A dict from part name to `{"trainable": int, "total": int}`.
    """
    from keras_qwenvl.convert import checkpoint_layout

    if stage is not None and stage not in STAGES:
        raise ValueError(f"`stage` must be 1, 2, 3 or None, got {stage!r}.")
    counts = {part: {"trainable": 0, "total": 0} for part in PARTS}
    for name, shape in checkpoint_layout(config).items():
        part = _part_of(name)
        size = math.prod(shape)
        counts[part]["total"] += size
        if stage and STAGES[stage][part] and name not in FIXED_WEIGHTS:
            counts[part]["trainable"] += size
    return counts


def _kept_by_blocks(layers, block_input, block, remat):
    """Bytes a stack of `layers` blocks keeps for the backward pass: every
    block's activations (`block` each), or, rematerialised, every block's
    input plus one block's activations while it is recomputed."""
    return layers * block_input + block if remat else layers * block


def _activation_bytes(
    config,
    stage,
    value_bytes,
    sequence_length,
    image_size,
    images_per_sample,
    remat,
    vision_remat=False,
):
    """Activations kept for the backward pass of one sample (bytes).

    Counted per token (or patch) and layer: the tensors a block's backward
    pass reads, with attention probabilities kept in float32 and in the
    compute dtype (no fused attention kernel). Decoder blocks:
    `8 * hidden + 4 * intermediate` values (norm inputs and outputs, query,
    key, value, attention context, MLP up, gate, its SiLU and the product)
    plus `heads * sequence` probabilities; with `remat` only each block's
    input is kept, plus one block's activations while it is recomputed.
    Logits: the logits, their gradient and a float32 softmax. A trained ViT
    keeps `8 * width + 2 * mlp` values per patch and layer plus
    `heads * patches` probabilities; with `vision_remat` only each block's
    input, plus one block's activations while it is recomputed. The
    adapter keeps its keys, values and queries. A frozen ViT keeps
    nothing.
    """
    s, b = sequence_length, value_bytes
    hidden = config["hidden_size"]
    intermediate = config["intermediate_size"] // 2
    heads = config["num_attention_heads"]
    probabilities = 4 + b  # float32 softmax and its compute-dtype copy
    block = s * (
        (8 * hidden + 4 * intermediate) * b + heads * s * probabilities
    )
    layers = config["num_hidden_layers"]
    decoder = _kept_by_blocks(layers, s * hidden * b, block, remat)
    logits = s * config["vocab_size"] * (2 * b + 4)

    visual = config["visual"]
    patches = (image_size // visual["patch_size"]) ** 2
    width, out = visual["width"], visual["output_dim"]
    queries = visual["n_queries"]
    adapter = (4 * patches + 3 * queries) * out * b + (
        out // ADAPTER_HEAD_DIM
    ) * queries * patches * probabilities
    vit = 0
    if STAGES[stage]["vision_tower"]:
        mlp = int(width * visual["mlp_ratio"])
        vit_block = patches * (
            (8 * width + 2 * mlp) * b
            + visual["heads"] * patches * probabilities
        )
        vit = _kept_by_blocks(
            visual["layers"], patches * width * b, vit_block, vision_remat
        )
    return decoder + logits + images_per_sample * (adapter + vit)


def memory_estimate(
    config,
    stage,
    devices=1,
    precision="mixed_bfloat16",
    sequence_length=None,
    image_size=None,
    images_per_sample=1,
    remat=True,
    gradient_accumulation=False,
    device_memory=80e9,
    vision_remat=False,
):
    """Training memory per device for one of the paper's stages.

    Assumes the model state (weights, gradients, AdamW moments) is fully
    sharded: each of the `devices` holds `1 / devices` of it, as with
    every weight split over all devices (ZeRO-3 / FSDP-like). Activations
    are not sharded: each device keeps those of its own samples (see
    `_activation_bytes`). XLA's temporary buffers and fragmentation are not
    counted: leave headroom.

    Args:
        config: a Hugging Face Qwen-VL config dict (e.g.
            `keras_qwenvl.presets.PUBLISHED_CONFIG`).
        stage: 1 (ViT and adapter train), 2 (all) or 3 (adapter and LLM).
        devices: the number of devices sharing the state.
        precision: "float32", "bfloat16" or "mixed_bfloat16" (the Keras
            dtype policy).
        sequence_length: tokens per sample; defaults to the paper's (512
            in stage 1, 2048 after).
        image_size: image side; defaults to the paper's (224, then 448).
        images_per_sample: images per sequence (packed rows hold several).
        remat: whether decoder blocks are rematerialised
            (`QwenVLBackbone(remat=True)`).
        gradient_accumulation: whether the optimizer accumulates gradients
            (`gradient_accumulation_steps > 1` keeps one more
            gradient-sized buffer).
        device_memory: bytes per device, for `max_batch_size`.
        vision_remat: whether ViT blocks are rematerialised
            (`QwenVLVisionEncoder(remat=True)`; matters in stages 1 and
            2, where the ViT trains).

    Returns:
        A dict: `parameters` and `trainable` counts; bytes per device of
        `weights`, `gradients`, `optimizer`, `accumulators` and their sum
        `state`; `activations_per_sample` in bytes; `max_batch_size`, the
        most samples per device that fit in `device_memory` (0 when the
        state alone does not fit).
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(
            f"`precision` must be one of {sorted(PRECISION_BYTES)}, got "
            f"{precision!r}."
        )
    if stage not in STAGE_SHAPES:
        raise ValueError(f"`stage` must be 1, 2 or 3, got {stage!r}.")
    if devices < 1:
        raise ValueError(f"`devices` must be at least 1, got {devices}.")
    weight, gradient, optimizer, value = PRECISION_BYTES[precision]
    counts = parameter_counts(config, stage)
    parameters = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    estimate = {
        "parameters": parameters,
        "trainable": trainable,
        "weights": parameters * weight / devices,
        "gradients": trainable * gradient / devices,
        "optimizer": trainable * optimizer / devices,
        "accumulators": (
            trainable * gradient / devices if gradient_accumulation else 0
        ),
    }
    estimate["state"] = sum(
        estimate[k]
        for k in ("weights", "gradients", "optimizer", "accumulators")
    )
    default_image, default_length = STAGE_SHAPES[stage]
    per_sample = _activation_bytes(
        config,
        stage,
        value,
        sequence_length or default_length,
        image_size or default_image,
        images_per_sample,
        remat,
        vision_remat,
    )
    estimate["activations_per_sample"] = per_sample
    estimate["max_batch_size"] = max(
        0, int((device_memory - estimate["state"]) // per_sample)
    )
    return estimate


def memory_table(config=None, device_counts=(1, 8, 64), **kwargs):
    """The README's memory table (Markdown) for `config`.

    Args:
        config: a Hugging Face Qwen-VL config dict; defaults to the
            published model's.
        device_counts: the device counts of the rows.
        **kwargs: further `memory_estimate` arguments.
    """
    if config is None:
        from keras_qwenvl.presets import PUBLISHED_CONFIG

        config = PUBLISHED_CONFIG
    gb = 1e9
    lines = [
        (
            "| stage | precision | devices | weights | gradients | AdamW | "
            "state / device | activations / sample | max batch / device |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in (1, 2, 3):
        for precision in PRECISION_BYTES:
            for devices in device_counts:
                e = memory_estimate(config, stage, devices, precision, **kwargs)
                lines.append(
                    f"| {stage} | {precision} | {devices} | "
                    f"{e['weights'] / gb:.1f} | {e['gradients'] / gb:.1f} | "
                    f"{e['optimizer'] / gb:.1f} | {e['state'] / gb:.1f} | "
                    f"{e['activations_per_sample'] / gb:.2f} | "
                    f"{e['max_batch_size']} |"
                )
    return "\n".join(lines)
