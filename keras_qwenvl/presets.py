"""Qwen-VL presets and the `from_preset` of every Qwen-VL class.

Two presets are registered, `qwen_vl_7b` (Qwen/Qwen-VL, the pre-trained and
multi-task model) and `qwen_vl_chat_7b` (Qwen/Qwen-VL-Chat, after supervised
fine-tuning). Both carry the published config, so

    QwenVLBackbone.from_preset("qwen_vl_7b", load_weights=False)

builds the 9.6B-parameter model with random weights anywhere. Their weights
and vocabulary come from the Hugging Face checkpoint folder, which is never
downloaded implicitly. Download it once:

    huggingface-cli download Qwen/Qwen-VL --local-dir /data/Qwen-VL

then either pass the folder itself, `from_preset("/data/Qwen-VL")`, or point
the preset name at it with an environment variable named after the preset,
`KERAS_QWENVL_QWEN_VL_7B=/data/Qwen-VL` (`KERAS_QWENVL_QWEN_VL_CHAT_7B` for
the chat model). The variable may also name a Keras preset folder written by
`tools/convert_qwen_vl_checkpoint.py`, which loads faster.

`QwenVLPresetMixin.from_preset` accepts:
1. a registered name (`qwen_vl_7b`, `qwen_vl_chat_7b`);
2. a Hugging Face Qwen-VL folder or handle (`config.json` with
   `"model_type": "qwen"` and a `visual` section), converted on the fly by
   `keras_qwenvl.convert`;
3. anything else keras-hub's own `from_preset` loads (Keras preset folders,
   `kaggle://`, `hf://` handles of Keras presets).
"""

import os
import warnings

from keras_hub.src.layers.preprocessing.image_converter import ImageConverter
from keras_hub.src.models.backbone import Backbone
from keras_hub.src.models.preprocessor import Preprocessor
from keras_hub.src.models.task import Task
from keras_hub.src.tokenizers.tokenizer import Tokenizer
from keras_hub.src.utils.preset_utils import CONFIG_FILE
from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import load_json

from keras_qwenvl.chat_format import DEFAULT_SYSTEM_PROMPT

# The published config.json of Qwen/Qwen-VL and Qwen/Qwen-VL-Chat (same
# architecture), restricted to the fields the converter reads.
PUBLISHED_CONFIG = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "vocab_size": 151936,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "intermediate_size": 22016,  # two MLP matrices of 11008
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "seq_length": 2048,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "tie_word_embeddings": False,
    "no_bias": True,
    "visual": {
        "image_size": 448,
        "patch_size": 14,
        "width": 1664,
        "layers": 48,
        "heads": 16,
        "mlp_ratio": 4.9231,  # int(1664 * 4.9231) = 8192
        "output_dim": 4096,
        "n_queries": 256,
        "image_start_id": 151857,
    },
}

# Token ids (QWEN_VL_REFERENCE.md, tokenizer section).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645

backbone_presets = {
    "qwen_vl_7b": {
        "metadata": {
            "description": (
                "Qwen-VL base model (pre-training and multi-task training, "
                "paper stages 1-2): Qwen-7B decoder, ViT-bigG/14 and a "
                "256-query adapter, 448x448 images. Plain prompts, no ChatML."
            ),
            "params": 9656935168,
            "path": "qwen_vl",
        },
        "kaggle_handle": "hf://Qwen/Qwen-VL",
        "hf_repo": "Qwen/Qwen-VL",
        "config": PUBLISHED_CONFIG,
        "generation": {
            "chat_format": "raw",
            "stop_token_ids": [ENDOFTEXT_ID],
            "max_new_tokens": 512,
        },
    },
    "qwen_vl_chat_7b": {
        "metadata": {
            "description": (
                "Qwen-VL-Chat: Qwen-VL after supervised fine-tuning on "
                "ChatML dialogues (paper stage 3), 448x448 images."
            ),
            "params": 9656935168,
            "path": "qwen_vl",
        },
        "kaggle_handle": "hf://Qwen/Qwen-VL-Chat",
        "hf_repo": "Qwen/Qwen-VL-Chat",
        "config": PUBLISHED_CONFIG,
        "generation": {
            "chat_format": "chatml",
            "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "stop_token_ids": [IM_END_ID, IM_START_ID],
            "max_new_tokens": 512,
            "max_window_size": 6144,
        },
    },
}


def preset_env_var(name):
    """The environment variable that points preset `name` at a folder."""
    return "KERAS_QWENVL_" + name.upper()


def preset_folder(name):
    """The folder the environment points registered preset `name` at, or
    None when the variable is unset or empty."""
    variable = preset_env_var(name)
    folder = os.environ.get(variable)
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise ValueError(
            f"{variable}={folder!r} does not name a folder. Point it at the "
            f"downloaded Hugging Face checkpoint of "
            f"{backbone_presets[name]['hf_repo']} (or a Keras preset folder)."
        )
    return folder


def missing_checkpoint_message(name):
    """How to provide the checkpoint of registered preset `name`."""
    repo = backbone_presets[name]["hf_repo"]
    folder = "/path/to/" + repo.split("/")[-1]
    return (
        f"Preset '{name}' takes its weights and tokenizer vocabulary from "
        f"the Hugging Face checkpoint {repo}, and no local copy was given. "
        "Download it (about 19 GB) with\n"
        f"    huggingface-cli download {repo} --local-dir {folder}\n"
        f"then set the environment variable {preset_env_var(name)}={folder} "
        f"or call from_preset('{folder}'). To build the model from the "
        "config alone, with random weights, pass load_weights=False."
    )


def _find_loader(preset):
    """(preset, loader): the `QwenVLPresetLoader` for a registered name or a
    Hugging Face Qwen-VL folder; loader None for keras-hub to handle."""
    # Imported here: `convert` imports the model classes, whose modules
    # import this one for the mixin.
    from keras_qwenvl.convert import QwenVLPresetLoader

    if isinstance(preset, str) and preset in backbone_presets:
        folder = preset_folder(preset)
        if folder is None:
            return preset, QwenVLPresetLoader(
                None,
                backbone_presets[preset]["config"],
                missing_files_message=missing_checkpoint_message(preset),
            )
        preset = folder
    if not isinstance(preset, str):
        return preset, None
    try:
        has_config = check_file_exists(preset, CONFIG_FILE)
    except ValueError:  # not a path or handle; keras-hub explains
        return preset, None
    if not has_config:
        return preset, None
    config = load_json(preset, CONFIG_FILE)
    if config.get("model_type") != "qwen":
        return preset, None
    return preset, QwenVLPresetLoader(preset, config)


def _load(loader, cls, **kwargs):
    """Build `cls` through `loader`, as keras-hub's `from_preset` of the
    matching base class would."""
    if issubclass(cls, Backbone):
        load_weights = kwargs.pop("load_weights", True)
        return loader.load_backbone(cls, load_weights, **kwargs)
    if issubclass(cls, Task):
        load_weights = kwargs.pop("load_weights", True)
        if (
            loader.preset is None
            and not load_weights
            and "preprocessor" not in kwargs
        ):
            warnings.warn(
                "Built without a preprocessor: the tokenizer vocabulary is "
                "part of the checkpoint folder. "
                + loader.missing_files_message,
                stacklevel=3,
            )
            kwargs["preprocessor"] = None
        return loader.load_task(cls, load_weights, True, **kwargs)
    if issubclass(cls, Preprocessor):
        return loader.load_preprocessor(cls, **kwargs)
    if issubclass(cls, Tokenizer):
        return loader.load_tokenizer(cls, **kwargs)
    if issubclass(cls, ImageConverter):
        return loader.load_image_converter(cls, **kwargs)
    raise TypeError(
        f"{cls.__name__} is not a keras-hub Backbone, Task, Preprocessor, "
        "Tokenizer or ImageConverter; it cannot load a Qwen-VL preset."
    )


class QwenVLPresetMixin:
    """`from_preset` for the Qwen-VL classes.

    Put it first among the bases of a keras-hub `Backbone`, `Task`,
    `Preprocessor`, `Tokenizer` or `ImageConverter` subclass. It resolves the
    registered names, converts Hugging Face Qwen-VL folders on the fly (which
    keras-hub cannot, not knowing `model_type` "qwen") and leaves every
    other preset to keras-hub.
    """

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Instantiate the class from a preset.

        Args:
            preset: a registered name (`qwen_vl_7b`, `qwen_vl_chat_7b`),
                a Hugging Face Qwen-VL checkpoint folder, or a Keras preset
                (folder or handle).
            **kwargs: as for keras-hub's `from_preset` of the base class:
                `load_weights` (models; default True), `dtype` (e.g.
                "bfloat16"), and constructor overrides such as
                `sequence_length` for a preprocessor.

        Examples:
        ```python
        # The published architecture with random weights.
        backbone = QwenVLBackbone.from_preset(
            "qwen_vl_7b", load_weights=False, dtype="bfloat16"
        )
        # Weights, tokenizer and preprocessing from a downloaded checkpoint.
        model = QwenVLCausalLM.from_preset("/data/Qwen-VL-Chat")
        ```
        """
        preset, loader = _find_loader(preset)
        if loader is None:
            return super().from_preset(preset, **kwargs)
        return _load(loader, cls, **kwargs)
