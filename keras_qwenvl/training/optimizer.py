"""The paper's optimiser: AdamW with per-weight learning rates, its cosine
schedule with linear warm-up, and the per-stage defaults.

Recipe (paper, training section; QWEN_VL_REFERENCE.md): AdamW with
beta1 0.9, beta2 0.98, eps 1e-6, weight decay 0.05, global gradient clip
1.0, cosine decay with linear warm-up, ViT layer-wise learning-rate decay
0.95 in stages 1 and 2.

Layer-wise decay is a real per-weight learning rate (`QwenVLAdamW`
multiplies the learning rate of each weight, inside the AdamW update and
its decoupled weight decay). Scaling gradients instead would do nothing
under Adam, whose step is invariant to the scale of the gradient.
"""

import dataclasses
import re

import keras
from keras import ops

from keras_qwenvl.training.stages import get_backbone

# Variable names that get no weight decay: biases, LayerNorm gamma/beta,
# RMSNorm scale. Fixed tables (the adapter's sin-cos `pos_embed`) are not
# trainable, so they never reach the optimizer.
NO_WEIGHT_DECAY_NAMES = ("bias", "gamma", "beta", "scale")


@dataclasses.dataclass(frozen=True)
class StageRecipe:
    """One column of the paper's training table.

    Attributes:
        peak_learning_rate: learning rate after warm-up.
        min_learning_rate: learning rate at the end of the cosine decay.
        warmup_steps: linear warm-up steps of the paper's run.
        total_steps: optimizer steps of the paper's run.
        layer_decay: ViT layer-wise learning-rate decay, None for none.
    """

    peak_learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    total_steps: int
    layer_decay: float | None


# Paper, training table: lr peak / min, warm-up, steps; layer decay 0.95 in
# stages 1 and 2 (stage 3 freezes the ViT).
STAGE_RECIPES = {
    1: StageRecipe(2e-4, 1e-6, 500, 50_000, 0.95),
    2: StageRecipe(5e-5, 1e-5, 400, 19_000, 0.95),
    3: StageRecipe(1e-5, 1e-6, 3000, 8000, None),
}


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLAdamW(keras.optimizers.AdamW):
    """AdamW with a learning-rate multiplier per weight.

    Each trainable weight's learning rate is the schedule's value times the
    multiplier of the first pattern in `learning_rate_multipliers` that
    matches its path (`re.search` on `variable.path`; 1 when none does).
    The multiplier scales both the Adam step and the decoupled weight decay
    (`w -= lr * multiplier * weight_decay * w`), as a per-parameter-group
    learning rate does in PyTorch. Weights whose name is in
    `no_weight_decay_names` (biases and norms) are not decayed.

    The step is PyTorch's `torch.optim.AdamW` (eps is added to the root of
    the bias-corrected second moment; Keras' `AdamW` adds it before the
    bias correction, a slightly larger eps in early steps). With
    `gradient_accumulation_steps` a learning-rate schedule counts optimizer
    updates, where Keras' optimizers count micro-batches, so `k`
    accumulated micro-batches make the same step as one batch `k` times
    larger. Sparse gradients (TensorFlow's embedding gradients) are made
    dense first, so that a token seen several times in a batch gets one
    summed gradient (Keras' own Adam squares its slices one by one).

    The defaults are the paper's: beta1 0.9, beta2 0.98, eps 1e-6, weight
    decay 0.05, global clip norm 1.0. Use `recipe_optimizer` for the
    per-stage schedule and the ViT layer-wise decay.

    Args:
        learning_rate: a float or a `keras.optimizers.schedules`
            schedule (called with the number of updates made so far).
        weight_decay: decoupled weight decay.
        beta_1, beta_2, epsilon: Adam's constants.
        global_clipnorm: gradients are scaled so that their global norm
            is at most this (None: no clipping).
        learning_rate_multipliers: a list of `(pattern, multiplier)` pairs
            (or a dict), regular expressions searched in variable paths.
        no_weight_decay_names: exact variable names exempt from weight
            decay.
        **kwargs: other `keras.optimizers.Optimizer` arguments, e.g.
            `gradient_accumulation_steps`.

    Example:
    ```python
    optimizer = QwenVLAdamW(
        learning_rate=1e-4,
        learning_rate_multipliers=[("vision_layer_0/", 0.5)],
    )
    ```
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.05,
        beta_1=0.9,
        beta_2=0.98,
        epsilon=1e-6,
        global_clipnorm=1.0,
        learning_rate_multipliers=None,
        no_weight_decay_names=NO_WEIGHT_DECAY_NAMES,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            global_clipnorm=global_clipnorm,
            **kwargs,
        )
        if self.amsgrad:
            raise ValueError("`QwenVLAdamW` does not implement AMSGrad.")
        if isinstance(learning_rate_multipliers, dict):
            learning_rate_multipliers = learning_rate_multipliers.items()
        pairs = []
        for pattern, multiplier in learning_rate_multipliers or ():
            if not multiplier > 0:
                raise ValueError(
                    "Learning-rate multipliers must be positive; got "
                    f"{multiplier!r} for pattern {pattern!r}."
                )
            pairs.append([str(pattern), float(multiplier)])
        self.learning_rate_multipliers = pairs
        self._multiplier_patterns = [
            (re.compile(pattern), multiplier) for pattern, multiplier in pairs
        ]
        self.no_weight_decay_names = list(no_weight_decay_names)
        self.exclude_from_weight_decay(
            var_names=[f"^{re.escape(n)}$" for n in self.no_weight_decay_names]
        )

    def learning_rate_multiplier(self, variable):
        """The multiplier of a variable's learning rate (1.0 by default)."""
        for pattern, multiplier in self._multiplier_patterns:
            if pattern.search(variable.path):
                return multiplier
        return 1.0

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Looked up by the index of the variable the optimizer was built
        # with, which every backend's update path provides.
        self._variable_multipliers = tuple(
            self.learning_rate_multiplier(v) for v in variables
        )
        self._variable_decays = tuple(
            bool(self.weight_decay) and self._use_weight_decay(v)
            for v in variables
        )

    def apply(self, grads, trainable_variables=None):
        # TensorFlow gives embedding lookups sparse gradients
        # (`IndexedSlices`) whose repeated rows Keras' element-wise ops
        # would square one by one (a wrong global norm and second moment).
        # A reshape makes them dense; for dense gradients it is free.
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            shapes = [v.shape for v in trainable_variables]
        else:
            shapes = [v.shape for v in self._trainable_variables]
        grads = [
            None if g is None else ops.reshape(g, shape)
            for g, shape in zip(grads, shapes)
        ]
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        """One AdamW step in PyTorch's form (eps added to the bias-corrected
        second moment's root), with this variable's learning rate."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        learning_rate = ops.multiply(
            ops.cast(learning_rate, dtype), self._variable_multipliers[index]
        )
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        if self._variable_decays[index]:
            self.assign_sub(
                variable,
                ops.multiply(variable, learning_rate * self.weight_decay),
            )
        m = self._momentums[index]
        v = self._velocities[index]
        self.assign_add(m, ops.multiply(gradient - m, 1 - self.beta_1))
        self.assign_add(
            v, ops.multiply(ops.square(gradient) - v, 1 - self.beta_2)
        )
        m_hat = ops.divide(m, 1 - ops.power(ops.cast(self.beta_1, dtype), step))
        v_hat = ops.divide(v, 1 - ops.power(ops.cast(self.beta_2, dtype), step))
        self.assign_sub(
            variable,
            ops.divide(
                ops.multiply(m_hat, learning_rate),
                ops.add(ops.sqrt(v_hat), self.epsilon),
            ),
        )

    def _apply_weight_decay(self, variables):
        """No-op: `update_step` decays each weight with its own rate."""

    def _get_current_learning_rate(self):
        # A schedule counts updates (`iterations`), not micro-batches.
        if isinstance(
            self._learning_rate,
            keras.optimizers.schedules.LearningRateSchedule,
        ):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learning_rate_multipliers": self.learning_rate_multipliers,
                "no_weight_decay_names": self.no_weight_decay_names,
            }
        )
        return config


def recipe_warmup_steps(stage, total_steps):
    """The paper's warm-up for a run of `total_steps` updates.

    The paper's warm-up steps, or, for a run shorter than the paper's, the
    same fraction of the run (stage 1: 1%, stage 2: 2.1%, stage 3: 37.5%),
    always leaving at least one step of decay.
    """
    recipe = _stage_recipe(stage)
    fraction = min(1.0, total_steps / recipe.total_steps)
    return min(round(recipe.warmup_steps * fraction), total_steps - 1)


def recipe_schedule(
    stage,
    total_steps,
    peak_learning_rate=None,
    min_learning_rate=None,
    warmup_steps=None,
):
    """Linear warm-up from 0 to the peak, then cosine decay to the minimum.

    The learning rate of update `s` (0-based) is `peak * s / warmup` during
    warm-up, then `min + (peak - min) * (1 + cos(pi * t)) / 2` with
    `t = (s - warmup) / (total_steps - warmup)`, and `min` from
    `total_steps` on.

    Args:
        stage: 1, 2 or 3: the defaults come from the paper's table.
        total_steps: optimizer updates of the run.
        peak_learning_rate, min_learning_rate, warmup_steps: overrides of
            the stage's defaults (warm-up: see `recipe_warmup_steps`).

    Returns:
        A `keras.optimizers.schedules.CosineDecay`.
    """
    recipe = _stage_recipe(stage)
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"`total_steps` must be a positive integer, got {total_steps!r}."
        )
    peak = recipe.peak_learning_rate
    peak = peak if peak_learning_rate is None else peak_learning_rate
    minimum = recipe.min_learning_rate
    minimum = minimum if min_learning_rate is None else min_learning_rate
    if not 0 <= minimum <= peak:
        raise ValueError(
            "Need 0 <= min_learning_rate <= peak_learning_rate, got "
            f"{minimum} and {peak}."
        )
    if warmup_steps is None:
        warmup_steps = recipe_warmup_steps(stage, total_steps)
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"`warmup_steps` ({warmup_steps}) must be in [0, total_steps) "
            f"with total_steps={total_steps}."
        )
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=total_steps - warmup_steps,
        alpha=minimum / peak if peak else 0.0,
        warmup_target=peak,
        warmup_steps=warmup_steps,
    )


def vit_layer_decay_multipliers(model, layer_decay):
    """Per-weight learning-rate multipliers of ViT layer-wise decay.

    With N ViT blocks and decay d: block i (0-based) gets d ** (N - i); the
    patch embedding, position table and `ln_pre` get d ** (N + 1); the
    adapter, `ln_post`, `proj` and the whole LLM keep 1.

    Args:
        model: a `QwenVLCausalLM` or `QwenVLBackbone`.
        layer_decay: d, in (0, 1].

    Returns:
        A list of `(pattern, multiplier)` pairs for `QwenVLAdamW`, patterns
        anchored at the layer and weight paths of this model; empty for a
        text-only model.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"`layer_decay` must be in (0, 1], got {layer_decay}.")
    encoder = get_backbone(model).vision_encoder
    if encoder is None:
        return []
    depth = len(encoder.vision_layers)
    stem = layer_decay ** (depth + 1)
    pairs = [
        (f"^{re.escape(encoder.position_embedding.path)}$", stem),
        (f"^{re.escape(encoder.patch_embedding.path)}/", stem),
        (f"^{re.escape(encoder.ln_pre.path)}/", stem),
    ]
    for i, block in enumerate(encoder.vision_layers):
        pairs.append((f"^{re.escape(block.path)}/", layer_decay ** (depth - i)))
    return pairs


def recipe_optimizer(model, stage, total_steps, **overrides):
    """The paper's optimiser for one stage, ready for `compile()`.

    AdamW (0.9, 0.98, eps 1e-6), weight decay 0.05 except on biases and
    norms, global clip 1.0, the stage's cosine schedule with linear warm-up
    (`recipe_schedule`) and, in stages 1 and 2, ViT layer-wise
    learning-rate decay 0.95 (`vit_layer_decay_multipliers`).

    Args:
        model: the `QwenVLCausalLM` or `QwenVLBackbone` to train (its layer
            paths key the layer-wise decay).
        stage: 1, 2 or 3.
        total_steps: optimizer updates of the run (with gradient
            accumulation, updates, not micro-batches).
        **overrides: `peak_learning_rate`, `min_learning_rate`,
            `warmup_steps`, `layer_decay` (None or 1.0 turns it off),
            `learning_rate` (replaces the schedule), and any
            `QwenVLAdamW` argument (`weight_decay`, `beta_2`,
            `gradient_accumulation_steps`, ...).

    Returns:
        A `QwenVLAdamW`.

    Example:
    ```python
    set_stage(model, 3)
    model.compile(
        optimizer=recipe_optimizer(model, stage=3, total_steps=1000),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ```
    """
    recipe = _stage_recipe(stage)
    schedule = recipe_schedule(
        stage,
        total_steps,
        peak_learning_rate=overrides.pop("peak_learning_rate", None),
        min_learning_rate=overrides.pop("min_learning_rate", None),
        warmup_steps=overrides.pop("warmup_steps", None),
    )
    overrides.setdefault("learning_rate", schedule)
    layer_decay = overrides.pop("layer_decay", recipe.layer_decay)
    if layer_decay is not None and "learning_rate_multipliers" not in overrides:
        overrides["learning_rate_multipliers"] = vit_layer_decay_multipliers(
            model, layer_decay
        )
    return QwenVLAdamW(**overrides)


def _stage_recipe(stage):
    if stage not in STAGE_RECIPES:
        raise ValueError(f"`stage` must be 1, 2 or 3, got {stage!r}.")
    return STAGE_RECIPES[stage]
