"""The README's main job in its quick mode: it trains, the loss falls, and the
saved preset reloads with identical outputs."""

import json

import keras
import numpy as np
import pytest

from keras_qwenvl.demo import synthetic as train_synthetic

from keras_qwenvl import QwenVLCausalLM


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="the quick demo runs once per CI, on the jax backend",
)
def test_quick_run_learns_and_its_preset_reloads(tmp_path):
    settings = train_synthetic.Settings(**train_synthetic.QUICK)
    metrics, model, probe = train_synthetic.run(settings, str(tmp_path))
    assert metrics["probe_loss_after"] < metrics["probe_loss_before"]
    for name in ("grounding_accuracy", "ocr_word_accuracy", "caption_exact_match"):
        assert 0.0 <= metrics[name] <= 1.0
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["settings"]["stage_steps"] == list(settings.stage_steps)
    for name in ("boxes.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    restored = QwenVLCausalLM.from_preset(str(tmp_path / "preset"))
    x, _, _ = probe
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(x)),
        keras.ops.convert_to_numpy(model(x)),
    )
