"""The README's main job: its command line, its learning-rate shares, its
vision pre-training and its stage mixtures. Its quick run is checked
through notebook 3 (tests/test_notebooks.py)."""

import importlib.util
import os
import platform
import subprocess
import sys

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


def test_stage_loaders_weight_the_phrases_as_set(tmp_path):
    """Every stage's batches carry `Settings.phrase_loss_weight` on the
    words of each `<ref>` phrase (grounding rows: the phrase, then the
    box's digits at 1)."""
    mixture = {stage: {"grounding": 1} for stage in (1, 2, 3)}
    settings = train_synthetic.Settings(
        **dict(train_synthetic.QUICK, stage_tasks=mixture)
    )
    assert settings.phrase_loss_weight == 5.0
    model = train_synthetic.build_model(settings, str(tmp_path))
    tokenizer = model.preprocessor.tokenizer
    for stage in (1, 2, 3):
        loader = train_synthetic.stage_loader(model, settings, stage, 1)
        x, y, weight = (np.asarray(v) for v in next(iter(loader.dataset())))
        values = set(np.unique(weight).tolist())
        assert values == {0.0, 1.0, 5.0}, (stage, values)
        words = tokenizer.detokenize(y[0][weight[0] == 5.0].tolist())
        assert words.startswith("the "), words


# === The script's restart with huge pages ===

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples",
    "train_synthetic.py",
)


def load_script():
    spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines; runs nothing (not __main__)
    return module


def test_huge_pages_only_on_new_glibc_and_never_over_the_users_choice():
    script = load_script()
    environ = {"PATH": "/bin", "KERAS_BACKEND": "torch"}
    glibc = ("glibc", "2.36")
    assert script.huge_page_environment(environ, "linux", glibc) == dict(
        environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"
    )
    assert environ == {"PATH": "/bin", "KERAS_BACKEND": "torch"}
    for user in ("", "glibc.malloc.arena_max=2"):
        chosen = dict(environ, GLIBC_TUNABLES=user)
        assert script.huge_page_environment(chosen, "linux", glibc) is None
    assert script.huge_page_environment(environ, "darwin", ("", "")) is None
    for libc in (("glibc", "2.34"), ("glibc", ""), ("musl", "1.2")):
        assert script.huge_page_environment(environ, "linux", libc) is None


def transparent_huge_pages_mode():
    """"always", "madvise" (huge pages where a program asks, as glibc does
    with the tunable), "never", or None where the kernel does not say."""
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    return text[text.index("[") + 1 : text.index("]")]


def minor_faults(environ):
    """Minor page faults of a process that mallocs, fills and frees a
    64 MiB block five times, as XLA's CPU runtime does with its scratch
    memory (each block a fresh mapping)."""
    code = (
        "import ctypes, resource\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "for _ in range(5):\n"
        "    block = libc.malloc(2**26)\n"
        "    ctypes.memset(block, 1, 2**26)\n"
        "    libc.free(block)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True,
        text=True, check=True,
    )
    return int(run.stdout)


@pytest.mark.skipif(
    sys.platform != "linux"
    or load_script().huge_page_environment(
        {}, sys.platform, platform.libc_ver()
    ) is None
    or transparent_huge_pages_mode() != "madvise",
    reason="needs Linux, glibc 2.35+ and transparent huge pages on request "
    "(with them always on, the tunable changes nothing)",
)
def test_huge_pages_cut_the_page_faults_of_large_buffers():
    """What the restart is for: with the tunable, fresh large buffers are
    mapped in 2 MiB pages (5 x 64 MiB is 81,920 faults of 4 KiB)."""
    script = load_script()
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    huge = script.huge_page_environment(
        plain, sys.platform, platform.libc_ver()
    )
    without, with_huge_pages = minor_faults(plain), minor_faults(huge)
    assert without > 80_000
    assert with_huge_pages < without / 5


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="runs once per CI, in the jax pass (the script itself picks JAX)",
)
def test_script_restarts_itself_once_with_huge_pages(tmp_path):
    """`python examples/train_synthetic.py` as a user runs it: a
    sitecustomize records each Python start's GLIBC_TUNABLES; `--help`
    stops the script right after it parses its command line."""
    log = tmp_path / "starts.txt"
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(repr(os.environ.get('GLIBC_TUNABLES')) + '\\n')\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path)] + [p for p in [environ.get("PYTHONPATH")] if p]
    )
    run = subprocess.run(
        [sys.executable, SCRIPT, "--help"], env=environ,
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "--quick" in run.stdout
    starts = log.read_text().splitlines()
    wanted = load_script().huge_page_environment(
        environ, sys.platform, platform.libc_ver()
    )
    if wanted is None:  # not Linux with glibc 2.35+: no restart
        assert starts == ["None"]
    else:
        assert starts == ["None", repr("glibc.malloc.hugetlb=1")]
    # The user's choice stands: no restart.
    log.unlink()
    environ["GLIBC_TUNABLES"] = ""
    run = subprocess.run(
        [sys.executable, SCRIPT, "--help"], env=environ,
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert log.read_text().splitlines() == ["''"]
