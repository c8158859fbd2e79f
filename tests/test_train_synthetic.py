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


def test_vision_encoder_learns_at_its_share_of_each_stage_rate(tmp_path):
    from keras_qwenvl.training import QwenVLAdamW

    settings = train_synthetic.Settings(
        **dict(train_synthetic.QUICK, layer_decay=0.9)
    )
    model = train_synthetic.build_model(settings, str(tmp_path))
    optimizer = QwenVLAdamW(
        learning_rate_multipliers=train_synthetic.learning_rate_multipliers(
            model, settings
        )
    )
    share = settings.vision_learning_rate_multiplier
    assert share < 1.0
    encoder = model.backbone.vision_encoder
    depth = len(encoder.vision_layers)
    seen = set()
    for variable in model.backbone.weights:
        got = optimizer.learning_rate_multiplier(variable)
        if variable.path.startswith(encoder.vision_layers[-1].path + "/"):
            want = share * 0.9  # the last ViT block: one step of decay
        elif variable.path.startswith(
            (encoder.patch_embedding.path, encoder.position_embedding.path,
             encoder.ln_pre.path)
        ):
            want = share * 0.9 ** (depth + 1)  # the stem
        elif variable.path.startswith(encoder.path + "/"):
            if "/vision_layer_" in variable.path:
                continue
            want = share  # adapter, ln_post, proj
        else:
            want = 1.0  # the language model
        seen.add(want)
        assert np.isclose(got, want), variable.path
    assert len(seen) == 4


def test_vision_pretraining_changes_only_the_vision_encoder(tmp_path):
    settings = train_synthetic.Settings(
        **dict(train_synthetic.QUICK, vision_pretraining_steps=3)
    )
    model = train_synthetic.build_model(settings, str(tmp_path))
    encoder = model.backbone.vision_encoder
    before = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    losses = train_synthetic.pretrain_vision(model, settings)
    assert len(losses) == 3 and all(np.isfinite(losses))
    changed = {
        v.path
        for v in model.weights
        if not np.array_equal(before[v.path], keras.ops.convert_to_numpy(v))
    }
    assert changed
    assert all(path.startswith(encoder.path + "/") for path in changed)
    assert encoder.patch_embedding.kernel.path in changed
    # The heads are not part of the model.
    assert len(model.weights) == len(before)


def test_stage_mixtures_come_from_the_settings(tmp_path, monkeypatch):
    from keras_qwenvl.data import synthetic as data_synthetic

    defaults = train_synthetic.Settings()
    assert defaults.stage_tasks == data_synthetic.STAGE_TASKS
    defaults.stage_tasks[2]["ocr"] = 99  # a copy: the module's table stays
    assert data_synthetic.STAGE_TASKS[2]["ocr"] != 99

    mixture = {1: {"caption": 1}, 2: {"ocr": 2, "vqa": 1}, 3: {"chat": 1}}
    settings = train_synthetic.Settings(
        **dict(train_synthetic.QUICK, stage_tasks=mixture)
    )
    model = train_synthetic.build_model(settings, str(tmp_path))
    seen = []

    class Drawn(Exception):
        pass

    def source(count, seed, tasks, **config):
        seen.append(tasks)
        raise Drawn

    monkeypatch.setattr(data_synthetic, "SyntheticSource", source)
    for stage in (1, 2, 3):
        steps = [0, 0, 0]
        steps[stage - 1] = 1
        settings.stage_steps = tuple(steps)
        with pytest.raises(Drawn):
            train_synthetic.train(model, settings)
    with pytest.raises(Drawn):
        train_synthetic.probe_batch(model, settings)
    assert seen == [mixture[1], mixture[2], mixture[3], mixture[2]]
