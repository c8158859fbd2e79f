"""Resumable training and checkpoints as Keras presets.

A run is a fixed number of optimizer steps over a deterministic stream of
batches: batch k depends only on k (and the data seed). A `TrainingState`
checkpoint saves the model's weights, the optimizer's state (its step count
drives the learning-rate schedule) and the number of steps done, every
`save_every` steps. `resumable_fit` reads the latest checkpoint, maps the
batch function over the remaining steps (a grain dataset) and trains them, so a run killed at
any step (mid-epoch included) resumes to the same weights as an uninterrupted
run.
"""

import json
import os

import keras

_WEIGHTS = "state.weights.h5"
_META = "state.json"


class TrainingState(keras.callbacks.Callback):
    """Saves weights, optimizer state and the step count every `save_every`
    steps into `directory` (written to a temporary name, then renamed, so a
    kill while saving leaves the previous checkpoint intact)."""

    def __init__(self, directory, save_every, start_step=0):
        super().__init__()
        if save_every < 1:
            raise ValueError(f"`save_every` must be >= 1, got {save_every}.")
        self.directory = directory
        self.save_every = save_every
        self.step = start_step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.save_every == 0:
            self.save()

    def save(self):
        os.makedirs(self.directory, exist_ok=True)
        weights = os.path.join(self.directory, _WEIGHTS)
        self.model.save_weights(weights + ".tmp.weights.h5")
        os.replace(weights + ".tmp.weights.h5", weights)
        meta = os.path.join(self.directory, _META)
        with open(meta + ".tmp", "w") as f:
            json.dump({"step": self.step}, f)
        os.replace(meta + ".tmp", meta)


def restore_training_state(model, directory):
    """Loads the latest checkpoint of `directory` into a compiled, built
    `model`; returns the number of steps it had done (0 without one)."""
    meta = os.path.join(directory, _META)
    if not os.path.exists(meta):
        return 0
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(directory, _WEIGHTS))
    with open(meta) as f:
        return int(json.load(f)["step"])


def resumable_fit(
    model,
    batch_at,
    total_steps,
    directory,
    save_every=100,
    callbacks=None,
    **fit_kwargs,
):
    """Trains `model` for `total_steps` steps, resuming from `directory`.

    Args:
        model: a compiled, built model (e.g. a `QwenVLCausalLM`).
        batch_at: `batch_at(k)` returns batch k of the run, a batch as
            `model.fit` takes it (raw examples when the model has a
            preprocessor); it must depend only on k.
        total_steps: optimizer steps of the whole run.
        directory: where the checkpoint lives (created as needed).
        save_every: steps between checkpoints.
        callbacks, **fit_kwargs: passed to `model.fit`.

    Returns:
        The `History` of this call's `fit`, or None if the run was done.
    """
    done = restore_training_state(model, directory)
    if done >= total_steps:
        return None
    import grain  # the `data` extra

    state = TrainingState(directory, save_every, start_step=done)
    batches = grain.MapDataset.range(done, total_steps).map(batch_at)
    history = model.fit(
        batches,
        epochs=1,
        steps_per_epoch=total_steps - done,
        callbacks=[state] + list(callbacks or []),
        shuffle=False,
        **fit_kwargs,
    )
    state.save()
    return history


class PresetCheckpoint(keras.callbacks.Callback):
    """Saves the task (backbone, preprocessor and all) as a Keras preset
    every `save_every` steps and at the end of training, into
    `directory/step_{n}` (and `directory/final`)."""

    def __init__(self, directory, save_every=None):
        super().__init__()
        self.directory = directory
        self.save_every = save_every
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.save_every and self.step % self.save_every == 0:
            self.model.save_to_preset(
                os.path.join(self.directory, f"step_{self.step}")
            )

    def on_train_end(self, logs=None):
        self.model.save_to_preset(os.path.join(self.directory, "final"))
