"""Which weights train: the paper's three stages and finer switches.

Qwen-VL splits into six parts (names as in `set_trainable`):
- `vision_tower`: the ViT, `patch_embedding`, `position_embedding`,
  `ln_pre` and `vision_layers`;
- `adapter`: the position-aware adapter (original `attn_pool`): `query`,
  `kv_proj`, `ln_q`, `ln_kv`, `attention`;
- `vision_output`: `ln_post` and `proj` after the adapter;
- `decoder`: `transformer_layers` and `final_normalization`;
- `embeddings`: `token_embedding.embeddings` (original `wte`);
- `lm_head`: `token_embedding.reverse_embeddings` (untied `lm_head`).

The paper's stages (QWEN_VL_REFERENCE.md, training recipe):
1. pre-training: ViT and adapter train, the LLM is frozen;
2. multi-task pre-training: everything trains;
3. supervised fine-tuning: adapter and LLM train, the ViT is frozen.

`ln_post` and `proj` belong to the vision encoder module of the original
code (`transformer.visual`) but sit after the adapter. The original
fine-tuning code ("fix_vit") freezes all of `visual` and then unfreezes
only `attn_pool`, so stage 3 keeps them frozen with the ViT; stages 1 and 2
train them.

The adapter's fixed sin-cos table `pos_embed` is not trainable in any
stage. Keras only gives the optimizer the trainable weights, so a frozen
weight has no optimizer state; change the stage before `compile()` (and
compile again after a change), as Keras requires whenever `trainable`
changes.
"""

import math

import keras

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.causal_lm import QwenVLCausalLM

PARTS = (
    "vision_tower",
    "adapter",
    "vision_output",
    "decoder",
    "embeddings",
    "lm_head",
)

# Paper, training recipe table: the trainable parts of each stage.
STAGES = {
    1: dict(
        vision_tower=True,
        adapter=True,
        vision_output=True,
        decoder=False,
        embeddings=False,
        lm_head=False,
    ),
    2: dict(
        vision_tower=True,
        adapter=True,
        vision_output=True,
        decoder=True,
        embeddings=True,
        lm_head=True,
    ),
    3: dict(
        vision_tower=False,
        adapter=True,
        vision_output=False,
        decoder=True,
        embeddings=True,
        lm_head=True,
    ),
}


def get_backbone(model):
    """The `QwenVLBackbone` of a `QwenVLCausalLM` or the backbone itself."""
    if isinstance(model, QwenVLCausalLM):
        return model.backbone
    if isinstance(model, QwenVLBackbone):
        return model
    raise TypeError(
        "Expected a `QwenVLCausalLM` or `QwenVLBackbone`, got "
        f"{type(model).__name__}."
    )


def model_parts(model):
    """Each part's units: the layers and single weights it consists of.

    A unit is a layer (its `trainable` setter covers its sublayers and
    leaves weights created non-trainable, such as the adapter's fixed
    `pos_embed`, frozen) or a single variable where one layer holds weights
    of two parts (the token embedding and the untied lm_head; the ViT
    position table, which the vision encoder holds next to its adapter).

    Returns:
        A dict from part name (see `PARTS`) to a list of units; the vision
        parts are empty for a text-only backbone.
    """
    backbone = get_backbone(model)
    embedding = backbone.token_embedding
    encoder = backbone.vision_encoder
    parts = {
        "decoder": list(backbone.transformer_layers)
        + [backbone.final_normalization],
        "embeddings": [embedding.embeddings],
        # A tied lm_head is the embedding matrix itself.
        "lm_head": [
            embedding.embeddings
            if embedding.tie_weights
            else embedding.reverse_embeddings
        ],
        "vision_tower": [],
        "adapter": [],
        "vision_output": [],
    }
    if encoder is not None:
        parts["vision_tower"] = [
            encoder.patch_embedding,
            encoder.position_embedding,
            encoder.ln_pre,
        ] + list(encoder.vision_layers)
        parts["adapter"] = [encoder.adapter]
        parts["vision_output"] = [encoder.ln_post, encoder.proj]
    return parts


def part_weights(unit):
    """The weights of a unit (a layer or a single variable)."""
    return [unit] if isinstance(unit, keras.Variable) else list(unit.weights)


def set_trainable(
    model,
    *,
    vision_tower=None,
    adapter=None,
    vision_output=None,
    decoder=None,
    embeddings=None,
    lm_head=None,
):
    """Make parts of Qwen-VL trainable (True) or frozen (False).

    None leaves a part as it is. Parts are set at the weight level, so the
    token embedding can train while the lm_head is frozen. Weights that are
    fixed by design (the adapter's sin-cos `pos_embed`) stay frozen.

    If the model itself was frozen (`model.trainable = False`), parts left
    as None stay frozen and only the parts set to True train.

    Args:
        model: a `QwenVLCausalLM` or `QwenVLBackbone`.
        vision_tower, adapter, vision_output, decoder, embeddings, lm_head:
            True, False or None for each part (see the module docstring).

    Example:
    ```python
    # Stage 3 but with the token embedding and lm_head frozen.
    set_stage(model, 3)
    set_trainable(model, embeddings=False, lm_head=False)
    ```
    """
    flags = {
        "vision_tower": vision_tower,
        "adapter": adapter,
        "vision_output": vision_output,
        "decoder": decoder,
        "embeddings": embeddings,
        "lm_head": lm_head,
    }
    parts = model_parts(model)
    backbone = get_backbone(model)
    for name, flag in flags.items():
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(
                f"`{name}` must be True, False or None, got {flag!r}."
            )
        if flag and not parts[name]:
            raise ValueError(
                f"Cannot make `{name}` trainable: the model has no vision "
                "encoder."
            )
    if backbone.token_embedding.tie_weights:
        if None not in (embeddings, lm_head) and embeddings != lm_head:
            raise ValueError(
                "The lm_head is tied to the token embedding "
                "(`tie_word_embeddings=True`): `embeddings` and `lm_head` "
                f"must agree, got {embeddings} and {lm_head}."
            )
        if embeddings is None:
            flags["embeddings"] = lm_head
        flags["lm_head"] = flags["embeddings"]
    if not model.trainable:
        # Every weight is frozen through the model's own flag; lifting it
        # unfreezes all weights, so every part is then set explicitly.
        flags = {name: bool(flag) for name, flag in flags.items()}
        if any(flags.values()):
            model.trainable = True
    for name, flag in flags.items():
        if flag is None:
            continue
        for unit in parts[name]:
            unit.trainable = flag


def set_stage(model, stage):
    """Set the trainable parts for one of the paper's training stages.

    Stage 1 trains the vision encoder, adapter, `ln_post` and `proj`
    (LLM frozen); stage 2 trains everything; stage 3 trains the adapter and
    the LLM (embeddings, decoder, lm_head) with the ViT, `ln_post` and
    `proj` frozen, as the original fine-tuning code's "fix_vit" does.

    Call it before `compile()`; after changing stages, compile again with
    a new optimizer (see `recipe_optimizer`).

    Args:
        model: a `QwenVLCausalLM` or `QwenVLBackbone` with a vision encoder.
        stage: 1, 2 or 3.
    """
    if stage not in STAGES:
        raise ValueError(f"`stage` must be 1, 2 or 3, got {stage!r}.")
    if get_backbone(model).vision_encoder is None:
        raise ValueError(
            f"Stage {stage} needs a model with a vision encoder; this "
            "backbone is text-only. Use `set_trainable` for text-only models."
        )
    set_trainable(model, **STAGES[stage])


def trainable_summary(model):
    """Parameter counts per part: how many train and how many there are.

    A weight trains when it and the model are trainable (what `fit()`
    optimises).

    Returns:
        A dict from part name to `{"trainable": int, "total": int}`. With a
        tied lm_head, `embeddings` and `lm_head` count the same matrix.
    """
    summary = {}
    for name, units in model_parts(model).items():
        weights = [w for unit in units for w in part_weights(unit)]
        summary[name] = {
            "trainable": sum(
                math.prod(w.shape)
                for w in weights
                if model.trainable and w.trainable
            ),
            "total": sum(math.prod(w.shape) for w in weights),
        }
    return summary
