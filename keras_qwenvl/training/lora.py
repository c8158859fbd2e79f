"""LoRA on the Qwen decoder, with the original fine-tuning code's defaults.

The original `finetune.py` uses rank 64, alpha 16 (the update is scaled by
alpha / rank) and dropout 0.05 on the decoder's `c_attn` (here `query`,
`key`, `value`), `attn.c_proj` (`attention_output`), `w1`
(`feedforward_intermediate_dense`) and `w2` (`feedforward_gate_dense`).
The ViT's layers of the same names get no LoRA.

Keras' `Dense.enable_lora` / `EinsumDense.enable_lora` provide the adapters
(A: he-uniform, B: zeros, both float32). Keras' LoRA has no dropout on the
adapter's input, so the original's dropout 0.05 is not reproduced.
"""

import keras
from keras import ops

from keras_qwenvl.training.stages import get_backbone
from keras_qwenvl.training.stages import set_trainable

# Attention projections and MLP matrices of a decoder block, by layer name.
ATTENTION_PROJECTIONS = ("query", "key", "value", "attention_output")
MLP_PROJECTIONS = (
    "feedforward_intermediate_dense",
    "feedforward_gate_dense",
    "feedforward_output_dense",
)
# Original finetune.py: target modules c_attn, attn.c_proj, w1, w2.
LORA_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS[:2]


def lora_target_layers(model, target_names=LORA_TARGETS):
    """The decoder projections named `target_names`, block by block.

    Args:
        model: a `QwenVLCausalLM` or `QwenVLBackbone`.
        target_names: names among `ATTENTION_PROJECTIONS` and
            `MLP_PROJECTIONS`.
    """
    if isinstance(target_names, str):
        target_names = (target_names,)
    known = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    unknown = sorted(set(target_names) - set(known))
    if unknown:
        raise ValueError(
            f"Unknown LoRA target names {unknown}; the decoder's projections "
            f"are {list(known)}."
        )
    layers = []
    for block in get_backbone(model).transformer_layers:
        for name in target_names:
            owner = block.attention if name in ATTENTION_PROJECTIONS else block
            layers.append(getattr(owner, name))
    return layers


def enable_lora(
    model,
    rank=64,
    alpha=16,
    target_names=LORA_TARGETS,
    train_embeddings=False,
    train_lm_head=False,
):
    """Add LoRA adapters to the decoder and freeze everything else.

    Only the adapters' `lora_kernel_a` / `lora_kernel_b` train (the target
    layers' kernels and biases are frozen, as with PEFT's default
    `bias="none"`), plus the token embedding and lm_head when asked: the
    original trains both in full when tuning the base model, which has not
    learned ChatML's special tokens. Compile after this call.

    Args:
        model: a `QwenVLCausalLM` or `QwenVLBackbone`.
        rank: LoRA rank (original: 64).
        alpha: LoRA alpha; the update is scaled by alpha / rank
            (original: 16).
        target_names: decoder projections that get adapters (see
            `lora_target_layers`).
        train_embeddings: also train the token embedding in full.
        train_lm_head: also train the lm_head in full.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    if not alpha > 0:
        raise ValueError(f"`alpha` must be positive, got {alpha!r}.")
    layers = lora_target_layers(model, target_names)
    already = [layer.path for layer in layers if layer.lora_enabled]
    if already:
        raise ValueError(f"LoRA is already enabled on {already}.")
    if not model.trainable:
        model.trainable = True
    set_trainable(
        model,
        vision_tower=False,
        adapter=False,
        vision_output=False,
        decoder=False,
        embeddings=train_embeddings,
        lm_head=train_lm_head,
    )
    for layer in layers:
        # Weights added to a frozen layer would be created frozen.
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha)
        adapters = (layer.lora_kernel_a, layer.lora_kernel_b)
        for weight in layer.weights:
            weight.trainable = any(weight is a for a in adapters)


def merge_lora(model):
    """Fold the LoRA adapters into their kernels and remove them.

    Each kernel becomes `kernel + alpha / rank * A @ B` (the adapters are
    float32; the sum keeps the kernel's dtype) and the layer a plain
    `Dense` / `EinsumDense` again, so the model saves and loads as a model
    without LoRA. Trainable flags of the other weights stay as they are;
    the merged kernels stay frozen. Compile again before further training.

    Args:
        model: a `QwenVLCausalLM` or `QwenVLBackbone` with LoRA enabled.
    """
    layers = [
        layer
        for layer in lora_target_layers(
            model, ATTENTION_PROJECTIONS + MLP_PROJECTIONS
        )
        if layer.lora_enabled
    ]
    if not layers:
        raise ValueError("The model has no LoRA adapters to merge.")
    for layer in layers:
        kernel = next(w for w in layer.weights if w.name == "kernel")
        delta = ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
        delta = delta * (layer.lora_alpha / layer.lora_rank)
        kernel.assign(kernel + ops.cast(delta, kernel.dtype))
        _remove_variable(layer, "lora_kernel_a")
        _remove_variable(layer, "lora_kernel_b")
        layer.lora_enabled = False
        layer.lora_rank = None
        layer.lora_alpha = None


def _remove_variable(layer, name):
    """`del layer.<name>` for a variable, without the full garbage
    collection Keras' `Layer.__delattr__` runs after each deletion (about
    half a second each in a large process, minutes for the 7B decoder)."""
    layer._untrack_variable(getattr(layer, name))
    super(keras.layers.Layer, layer).__delattr__(name)
