"""Resumable training: a run killed mid-way resumes to the same weights."""

import grain
import keras
import numpy as np
import pytest

from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.training.resume import PresetCheckpoint
from keras_qwenvl.training.resume import resumable_fit
from tests.test_model import span
from tests.test_model import tiny_backbone


def batch_at(step):
    """Batch k depends only on k."""
    rng = np.random.default_rng(step)
    ids = rng.integers(0, 200, (2, 12)).astype("int32")
    ids[0, 2 : 2 + len(span())] = span()
    x = {
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "images": rng.standard_normal((2, 1, 28, 28, 3)).astype("float32"),
    }
    return x, np.roll(ids, -1, axis=1), np.ones(ids.shape, "float32")


def fresh_model():
    model = QwenVLCausalLM(tiny_backbone())
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=8, warmup_target=1e-2, warmup_steps=3
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        # TensorFlow traces the AdamW update once per variable with the
        # schedule's branches inside (~40 s per new model here); what this
        # file checks, the checkpoint and its resumption, is the same
        # eagerly. The compiled step is tested in tests/test_training.py.
        run_eagerly=keras.config.backend() == "tensorflow",
    )
    return model


class Kill(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("killed")


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    total = 7
    reference = fresh_model()
    resumable_fit(reference, batch_at, total, str(tmp_path / "a"), verbose=0)
    expected = reference.get_weights()

    model = fresh_model()
    with pytest.raises(RuntimeError, match="killed"):
        # Checkpoints at steps 2 and 4; killed after step 5 (mid-interval).
        resumable_fit(
            model,
            batch_at,
            total,
            str(tmp_path / "b"),
            save_every=2,
            callbacks=[Kill(5)],
            verbose=0,
        )
    resumed = fresh_model()  # a new process would start from scratch
    history = resumable_fit(
        resumed, batch_at, total, str(tmp_path / "b"), save_every=2, verbose=0
    )
    assert len(history.history["loss"]) == 1
    assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == total
    for got, want in zip(resumed.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # A finished run does nothing more.
    assert resumable_fit(resumed, batch_at, total, str(tmp_path / "b")) is None


def test_preset_checkpoint_saves_loadable_presets(tmp_path):
    model = fresh_model()
    model.fit(
        grain.MapDataset.range(2).map(batch_at),
        steps_per_epoch=2,
        epochs=1,
        callbacks=[PresetCheckpoint(str(tmp_path), save_every=1)],
        verbose=0,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "final", "step_1", "step_2"
    ]
    restored = QwenVLCausalLM.from_preset(str(tmp_path / "final"))
    x, _, _ = batch_at(99)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(x)),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-6,
    )
