"""Training Qwen-VL with `fit()`: stages, the paper's optimiser, LoRA,
resumable runs and preset checkpoints."""

from keras_qwenvl.training.lora import LORA_TARGETS
from keras_qwenvl.training.lora import enable_lora
from keras_qwenvl.training.lora import lora_target_layers
from keras_qwenvl.training.lora import merge_lora
from keras_qwenvl.training.optimizer import STAGE_RECIPES
from keras_qwenvl.training.optimizer import QwenVLAdamW
from keras_qwenvl.training.optimizer import recipe_optimizer
from keras_qwenvl.training.optimizer import recipe_schedule
from keras_qwenvl.training.optimizer import recipe_warmup_steps
from keras_qwenvl.training.optimizer import vit_layer_decay_multipliers
from keras_qwenvl.training.resume import PresetCheckpoint
from keras_qwenvl.training.resume import TrainingState
from keras_qwenvl.training.resume import restore_training_state
from keras_qwenvl.training.resume import resumable_fit
from keras_qwenvl.training.stages import PARTS
from keras_qwenvl.training.stages import STAGES
from keras_qwenvl.training.stages import set_stage
from keras_qwenvl.training.stages import set_trainable
from keras_qwenvl.training.stages import trainable_summary

__all__ = [
    "LORA_TARGETS",
    "PARTS",
    "STAGES",
    "STAGE_RECIPES",
    "PresetCheckpoint",
    "QwenVLAdamW",
    "TrainingState",
    "enable_lora",
    "lora_target_layers",
    "merge_lora",
    "recipe_optimizer",
    "recipe_schedule",
    "recipe_warmup_steps",
    "restore_training_state",
    "resumable_fit",
    "set_stage",
    "set_trainable",
    "trainable_summary",
    "vit_layer_decay_multipliers",
]
