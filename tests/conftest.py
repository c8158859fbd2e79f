"""Shared fixtures: the reference material in ../shared and the golden checkpoint.

Tests that need ../shared (the real vocabulary, the golden fixture) skip with a
message naming the missing path, so a fresh clone without it still passes.
The golden checkpoint (~150 MiB) is written once into `.cache/` of the repo
and reused by later sessions; its spec's hash names the folder.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get(
    "QWENVL_SHARED", os.path.join(os.path.dirname(REPO), "shared")
)
GOLDEN = os.path.join(SHARED, "golden")
CACHE = os.path.join(REPO, ".cache")

# JAX's persistent compilation cache, shared by the test processes and the
# subprocesses they start (notebook kernels, example scripts): most of a
# JAX test's time is XLA compiling, and tests that build the same model
# compile the same programs. Set before JAX is imported, so that it reads
# them; a value in the environment wins, and an empty directory turns the
# cache off. Under `.cache/`, so a rerun on the same machine starts warm
# (a suite run adds some 30 MB; delete the folder to reclaim it). No size
# limit: with one, JAX locks the folder and reads every entry's access
# time on each write, which made the suite slower, not faster.
for _name, _value in (
    ("JAX_COMPILATION_CACHE_DIR", os.path.join(CACHE, "jax_compilation")),
    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
):
    os.environ.setdefault(_name, _value)

# XLA's CPU compiler at LLVM optimisation level 0, in the test processes
# and the subprocesses they start. The test models are small, so most of
# a JAX test's time, and much of a TensorFlow test's (Keras compiles its
# steps with XLA there), is compiling, and level 0 compiles faster than it
# runs slower: from a cold cache the JAX pass took 13.7 instead of 16.3
# minutes on a 2-core machine, with the same results (the programs are the
# same; LLVM only does less work on their machine code, and XLA uses no
# fast-math either way). A level in the environment's XLA_FLAGS wins.
_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()
    )


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="run tests marked slow"
    )
    parser.addoption(
        "--run-large",
        action="store_true",
        help="run tests that build the full 9.6B model (about 19 GB)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: needs --run-slow"))
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(
                pytest.mark.skip(reason="large and slow (19 GB): needs --run-large")
            )


def _require(path):
    if not os.path.exists(path):
        pytest.skip(f"shared reference material absent: {path}")
    return path


@pytest.fixture(scope="session")
def vocabulary_file():
    """The real qwen.tiktoken (151,643 ranks)."""
    return _require(os.path.join(SHARED, "qwen.tiktoken"))


@pytest.fixture(scope="session")
def golden():
    """golden_A.json as a dict, plus the arrays of golden_A.npz under 'arrays'."""
    _require(os.path.join(GOLDEN, "golden_A.json"))
    with open(os.path.join(GOLDEN, "golden_A.json")) as f:
        data = json.load(f)
    data["arrays"] = dict(np.load(os.path.join(GOLDEN, "golden_A.npz")))
    data["images_dir"] = os.path.join(GOLDEN, "images")
    return data


@pytest.fixture(scope="session")
def golden_hf_dir():
    """The golden random checkpoint in the published Hugging Face layout."""
    spec = _require(os.path.join(GOLDEN, "spec_A.json"))
    script = os.path.join(GOLDEN, "make_checkpoint.py")
    with open(spec, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = os.path.join(CACHE, f"golden_A_{digest}")
    stamp = os.path.join(out, ".complete")
    if not os.path.exists(stamp):
        os.makedirs(CACHE, exist_ok=True)
        tmp = out + f".tmp{os.getpid()}"
        subprocess.run(
            [sys.executable, script, spec, tmp], check=True, capture_output=True
        )
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, out)
        except OSError:  # another worker won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    """A `QwenVLTokenizer` on the 256-byte vocabulary (no shared files)."""
    from keras_qwenvl.tokenizer import QwenVLTokenizer
    from keras_qwenvl.tokenizer import write_byte_level_vocabulary

    folder = tmp_path_factory.mktemp("vocabulary")
    return QwenVLTokenizer(write_byte_level_vocabulary(folder / "bytes.tiktoken"))
