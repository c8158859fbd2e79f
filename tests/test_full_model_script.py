"""benchmarks/full_model.py, the prepared accelerator run of the published
model, on its small configuration: it runs end to end on every backend and
reports every number it is for."""

import math
import os
import sys

import keras

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
)
import full_model  # noqa: E402


# bfloat16 on JAX, whose XLA runs it at a usable speed on a CPU; on a CPU
# without bfloat16 units PyTorch and TensorFlow run it several times slower
# than float32 (PyTorch, 2 cores: 217 s against 35 s), so there the script
# runs in float32.
DTYPE = "bfloat16" if keras.config.backend() == "jax" else "float32"


def test_tiny_run_reports_memory_speed_and_utilisation():
    # The shortest training row and 16 new tokens: every step runs, in a
    # fraction of the default run's time.
    report = full_model.main([
        "--config", "tiny", "--train-steps", "1", "--train-length", "300",
        "--new-tokens", "16", "--dtype", DTYPE,
    ])
    assert report["dtype"] == DTYPE and report["parameters"] > 0
    assert report["matmul_tflops"] > 0
    assert set(report["decode_tokens_per_s"]) == {"batch_1", "batch_16"}
    speeds = [report["prefill_tokens_per_s"], report["training"]["tokens_per_s"]]
    speeds += list(report["decode_tokens_per_s"].values())
    assert all(speed > 0 for speed in speeds)
    training = report["training"]
    assert 0 < training["mfu"] and math.isfinite(training["loss"])
    # Only the LoRA adapters train: a small fraction of the model.
    assert training["mode"] == "lora"
    assert 0 < training["trained_parameters"] < report["parameters"] / 50
    memory = report["peak_memory_gb"]
    assert list(memory) == [
        "after_build", "after_prefill", "after_generation", "after_training"
    ]
    assert all(value > 0 for value in memory.values())
