"""The README's main job: its command line, its learning-rate shares, its
vision pre-training and its stage mixtures. Its quick run is checked
through notebook 3 (tests/test_notebooks.py)."""

import keras
import numpy as np
import pytest

from keras_qwenvl.demo import synthetic as train_synthetic


def test_command_line_runs_the_settings_it_names(tmp_path, monkeypatch):
    """`--quick`, `--seed` and `--out` reach `run`. The quick run itself is
    checked once per CI through notebook 3, whose reduced mode runs the same
    `Settings(**QUICK)` (tests/test_notebooks.py,
    `test_three_stages_run_is_the_quick_main_job`)."""
    calls = []

    def run(settings, out):
        calls.append((settings, out))
        return {"settings": None, "wall_time_s": 1.0}, None, None

    monkeypatch.setattr(train_synthetic, "run", run)
    train_synthetic.main(["--quick", "--seed", "3", "--out", str(tmp_path)])
    train_synthetic.main([])
    quick = train_synthetic.Settings(seed=3, **train_synthetic.QUICK)
    assert calls == [
        (quick, str(tmp_path)),
        (train_synthetic.Settings(), "train_synthetic_out"),
    ]


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
