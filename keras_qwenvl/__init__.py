"""keras_qwenvl: Qwen-VL (arXiv 2308.12966) as a Keras 3 / keras-hub model.

Importing the package registers every class with Keras serialization, so
presets saved by this package load through `keras_hub.models.*.from_preset`.
"""

from keras_hub.src.utils.preset_utils import register_presets

from keras_qwenvl.adapter import QwenVLAdapter
from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.boxes import denormalize_box
from keras_qwenvl.boxes import format_box
from keras_qwenvl.boxes import format_quad
from keras_qwenvl.boxes import format_ref
from keras_qwenvl.boxes import normalize_box
from keras_qwenvl.boxes import parse_grounding
from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.causal_lm_preprocessor import select_loss_positions
from keras_qwenvl.chat_format import build_chat_prompt
from keras_qwenvl.decoder import QwenVLDecoderBlock
from keras_qwenvl import evaluation
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.losses import QwenVLCrossEntropy
from keras_qwenvl.presets import backbone_presets
from keras_qwenvl.samplers import QwenVLGreedySampler
from keras_qwenvl.tokenizer import QwenVLTokenizer
from keras_qwenvl import training  # registers QwenVLAdamW for saved configs
from keras_qwenvl import visualize
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder

__version__ = "0.1.0"

# `qwen_vl_7b` and `qwen_vl_chat_7b` for every class with a backbone_cls.
register_presets(backbone_presets, QwenVLBackbone)

__all__ = [
    "QwenVLAdapter",
    "QwenVLBackbone",
    "QwenVLCausalLM",
    "QwenVLCausalLMPreprocessor",
    "QwenVLCrossEntropy",
    "QwenVLDecoderBlock",
    "QwenVLGreedySampler",
    "QwenVLImageConverter",
    "QwenVLTokenizer",
    "QwenVLVisionEncoder",
    "build_chat_prompt",
    "denormalize_box",
    "evaluation",
    "format_box",
    "format_quad",
    "format_ref",
    "normalize_box",
    "parse_grounding",
    "select_loss_positions",
    "training",
    "visualize",
]
