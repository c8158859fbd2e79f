"""Helpers for the example notebooks' reduced (CPU) mode.

`write_random_checkpoint` writes a small Qwen-VL-Chat with random weights
in the published Hugging Face layout (config.json, model.safetensors,
qwen.tiktoken), so that a notebook converts and fine-tunes it exactly as it
would the real `Qwen/Qwen-VL-Chat` folder, with no download. Its
vocabulary is byte-level (`write_byte_level_vocabulary`): 256 byte tokens
followed by Qwen's special tokens.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

from keras_qwenvl.convert import checkpoint_layout
from keras_qwenvl.tokenizer import QwenVLTokenizer
from keras_qwenvl.tokenizer import write_byte_level_vocabulary


def random_checkpoint_config(
    vocabulary_size,
    image_start_id,
    hidden_dim=128,
    num_layers=2,
    num_heads=4,
    intermediate_dim=256,
    seq_length=512,
    image_size=56,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    num_queries=16,
):
    """A Qwen-VL `config.json` dict with the given (small) sizes.

    The fields are those of the published config that the converter reads
    (`keras_qwenvl.convert.convert_backbone_config`). `num_queries` must be
    a square (the adapter's queries form a grid) and `hidden_dim` a multiple
    of 128 (the adapter's head width in the published model).
    """
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": vocabulary_size,
        "hidden_size": hidden_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "kv_channels": hidden_dim // num_heads,
        # Counts both MLP input matrices (w1 and w2), as published.
        "intermediate_size": 2 * intermediate_dim,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "seq_length": seq_length,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "tie_word_embeddings": False,
        "no_bias": True,
        "visual": {
            "image_size": image_size,
            "patch_size": 14,
            "width": vision_width,
            "layers": vision_layers,
            "heads": vision_heads,
            "mlp_ratio": 2.0,
            "output_dim": hidden_dim,
            "n_queries": num_queries,
            "image_start_id": image_start_id,
        },
    }


def write_random_checkpoint(folder, seed=0, **sizes):
    """Writes a small random Qwen-VL-Chat in the Hugging Face layout.

    Matrices are drawn from N(0, 0.02), norm scales are 1 and biases 0.

    Args:
        folder: the output folder (created if needed).
        seed: the numpy seed of the weights.
        **sizes: `random_checkpoint_config` arguments (other than the
            vocabulary's), e.g. `num_layers=1`.

    Returns:
        `folder`, ready for `QwenVLCausalLM.from_preset(folder)`.
    """
    os.makedirs(folder, exist_ok=True)
    vocabulary = write_byte_level_vocabulary(
        os.path.join(folder, "qwen.tiktoken")
    )
    tokenizer = QwenVLTokenizer(vocabulary)
    config = random_checkpoint_config(
        tokenizer.vocabulary_size(), tokenizer.image_start_token_id, **sizes
    )
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in checkpoint_layout(config).items():
        if name.endswith((".bias", "_bias")):
            value = np.zeros(shape)
        elif len(shape) == 1:  # LayerNorm / RMSNorm scales
            value = np.ones(shape)
        else:
            value = rng.normal(0.0, 0.02, shape)
        tensors[name] = value.astype("float32")
    save_file(
        tensors,
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(folder, "config.json"), "w") as file:
        json.dump(config, file, indent=2)
    return folder
