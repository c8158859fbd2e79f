"""The example notebooks: their layout, and a run of each in reduced mode.

Every notebook in examples/notebooks is executed with nbclient in a fresh
`python3` kernel with `QWENVL_NOTEBOOK_REDUCED=1` (small models, a few
steps, CPU); a cell that raises fails its test with the cell's traceback.
The quick start converts the golden random checkpoint (`golden_hf_dir`) when
the shared reference material is present, else a small checkpoint it writes
itself. The runs share one module fixture that executes two notebooks at a
time: each kernel is its own process, and most of a reduced run is XLA
compiling on one core.

The runs need JAX (notebook 4 shards a model with `keras.distribution`,
which Keras implements for JAX only), so they skip on the other backends.
"""

import asyncio
import glob
import os
import re

import keras
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "examples", "notebooks")
NOTEBOOKS = sorted(
    os.path.basename(path)
    for path in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb"))
)
QUICKSTART = "01_quickstart.ipynb"
THREE_STAGES = "03_three_stages.ipynb"
# Seconds one cell may take in reduced mode (a whole reduced run is ~1 min).
CELL_TIMEOUT = 300
CONCURRENT_KERNELS = 2
# A cell that raised, a cell past CELL_TIMEOUT, a kernel that died.
RUN_ERRORS = (
    nbclient.exceptions.CellExecutionError,
    nbclient.exceptions.CellTimeoutError,
    nbclient.exceptions.DeadKernelError,
)
# Terminal colour codes in IPython tracebacks.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="the notebooks run on JAX (notebook 4 shards a model with "
    "keras.distribution, which exists for JAX only); run under "
    "KERAS_BACKEND=jax",
)


def read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def kernel_environment(temporary_dir, checkpoint=None):
    """The test process's environment, in reduced mode, with the repository
    importable (the kernel runs in examples/notebooks) and the notebook's
    temporary files (`tempfile`) under `temporary_dir`."""
    env = dict(os.environ)
    env["TMPDIR"] = str(temporary_dir)
    env["QWENVL_NOTEBOOK_REDUCED"] = "1"
    env["KERAS_BACKEND"] = "jax"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.pop("QWENVL_NOTEBOOK_CHECKPOINT", None)
    if checkpoint is not None:
        env["QWENVL_NOTEBOOK_CHECKPOINT"] = checkpoint
    return env


async def _execute(name, env, semaphore):
    """Runs one notebook; returns the executed notebook or the error."""
    async with semaphore:
        notebook = read(name)
        client = nbclient.NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=CELL_TIMEOUT,
            resources={"metadata": {"path": NOTEBOOK_DIR}},
        )
        try:
            await client.async_execute(env=env)
        except RUN_ERRORS as error:  # reported by the notebook's test
            return error
        return notebook


async def _execute_all(environments):
    semaphore = asyncio.Semaphore(CONCURRENT_KERNELS)
    results = await asyncio.gather(
        *(_execute(name, env, semaphore) for name, env in environments.items())
    )
    return dict(zip(environments, results))


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
    """The notebooks whose run was selected, run in reduced mode:
    name -> (executed notebook or error, the kernel's temporary folder)."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_notebook_runs_in_reduced_mode"
    }
    if any(
        item.originalname == "test_three_stages_run_is_the_quick_main_job"
        for item in request.session.items
    ):
        selected.add(THREE_STAGES)
    selected = sorted(selected)
    golden = None  # the quick start then writes its own small checkpoint
    if QUICKSTART in selected:
        try:
            golden = request.getfixturevalue("golden_hf_dir")
        except pytest.skip.Exception:
            pass
    folders = {
        name: tmp_path_factory.mktemp(name.split(".")[0]) for name in selected
    }
    environments = {
        name: kernel_environment(
            folders[name], golden if name == QUICKSTART else None
        )
        for name in selected
    }
    results = asyncio.run(_execute_all(environments))
    return {name: (results[name], folders[name]) for name in selected}


def test_there_are_four_notebooks():
    assert NOTEBOOKS == [
        "01_quickstart.ipynb",
        "02_finetune_lora.ipynb",
        "03_three_stages.ipynb",
        "04_distributed.ipynb",
    ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_layout(name):
    notebook = read(name)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert "**Hardware.**" in first.source and "Reduced mode" in first.source
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # Stored clean: no outputs, no execution counts.
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    # The parameter cell comes first; the install cell only installs in Colab.
    assert 'os.environ.get("QWENVL_NOTEBOOK_REDUCED") == "1"' in code[0].source
    assert code[1].source.startswith("if IN_COLAB:\n    !pip install")
    # What a notebook imports comes from the installed package: nothing is
    # cloned or put on sys.path (in Colab there is no repository checkout).
    for cell in code:
        assert "git clone" not in cell.source and "sys.path" not in cell.source


@jax_only
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_reduced_mode(executed, name):
    result, _ = executed[name]
    if isinstance(result, Exception):
        traceback = ANSI_ESCAPE.sub("", str(result))
        pytest.fail(f"{name} failed in reduced mode:\n{traceback}", pytrace=False)
    code = [cell for cell in result.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    errors = [
        output
        for cell in code
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors


@jax_only
def test_three_stages_run_is_the_quick_main_job(executed):
    """The README's main job in its quick mode (what CI runs): notebook 3 in
    reduced mode runs exactly `Settings(**QUICK)` through
    `train_synthetic.run`, so its run is checked here rather than trained a
    second time: the loss falls, the outputs are written, and the saved
    preset reloads (weights and preprocessor) with the same probe loss."""
    import dataclasses
    import json

    import numpy as np

    from keras_qwenvl import QwenVLCausalLM
    from keras_qwenvl.demo import synthetic as train_synthetic

    result, folder = executed[THREE_STAGES]
    if isinstance(result, Exception):
        pytest.fail(f"{THREE_STAGES} failed in reduced mode", pytrace=False)
    (metrics_path,) = glob.glob(os.path.join(folder, "*", "metrics.json"))
    out = os.path.dirname(metrics_path)
    with open(metrics_path) as f:
        metrics = json.load(f)
    settings = train_synthetic.Settings(**train_synthetic.QUICK)
    as_json = json.loads(json.dumps(dataclasses.asdict(settings)))
    assert metrics["settings"] == as_json
    assert metrics["probe_loss_after"] < metrics["probe_loss_before"]
    scores = ("grounding_accuracy", "ocr_word_accuracy", "caption_exact_match")
    for name in scores:
        assert 0.0 <= metrics[name] <= 1.0
    for name in ("boxes.png", "loss.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    restored = QwenVLCausalLM.from_preset(os.path.join(out, "preset"))
    probe = train_synthetic.probe_batch(restored, settings)
    np.testing.assert_allclose(
        train_synthetic.probe_loss(restored, probe),
        metrics["probe_loss_after"],
        rtol=1e-6,
    )
