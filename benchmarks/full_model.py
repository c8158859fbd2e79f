"""The published Qwen-VL (9.6B) on one accelerator: memory and speed.

One prepared run for a GPU (or TPU) host. It builds the full published
architecture (`keras_qwenvl.presets.PUBLISHED_CONFIG`: ViT-bigG/14 at 448
pixels, the 256-query adapter, Qwen-7B) in bfloat16 with random weights, so
nothing is downloaded, and then:

1. prefill: one forward pass over a 300-token prompt holding one 448x448
   image (tokens/s);
2. generation: 64 new greedy tokens (`--new-tokens`) after that prompt at
   batch 1 and 16 (decoding tokens/s, from two calls that share one
   compiled function, as in `benchmark.py`);
3. training: stage-3 steps with LoRA (rank 64, alpha 16 on the decoder's
   attention and MLP projections, the original `finetune.py`'s defaults;
   everything else frozen), or with `--training stage3` the full stage 3
   (everything but the ViT trains), with the paper's optimiser, on rows of
   `--train-length` tokens with one image each (decoder blocks
   rematerialised);

and prints one JSON object: the device, peak device memory after each
phase, tokens/s, and the training step's model FLOPs utilisation against
the device's bfloat16 matmul peak, measured in the same run. Training FLOPs
count what the step must compute: the frozen ViT and adapter forward, and
the decoder forward plus the gradients of its activations (4 x weights x
tokens; frozen weights get no weight gradients; the LoRA matrices are
< 1% of it), plus the weight gradients (6 x weights x tokens in all) with
`--training stage3`.

    KERAS_BACKEND=jax python benchmarks/full_model.py --out /tmp/full_model
    python benchmarks/full_model.py --config tiny   # a CPU smoke run

`--config tiny` runs the same steps on a small configuration (any machine,
a minute or a few on CPU); the test suite runs it on every backend with
300-token training rows and 16 new tokens (`--dtype float32` on PyTorch and
TensorFlow, whose bfloat16 matmuls are slow on CPUs without bfloat16
units; the report's matmul peak and MFU are then float32's).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402 (benchmarks/benchmark.py: shared measurements)

# `benchmark.qwen_vl_config` arguments of the CPU smoke configuration.
TINY = (128, 2, 4, 512, 64, 2, 2, 112)
GENERATE_BATCHES = (1, 16)
NEW_TOKENS = 64
LORA_RANK, LORA_ALPHA = 64, 16


def device_name():
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
        return f"cpu: {platform.processor() or platform.machine()}"
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"gpu: {gpus[0].name}" if gpus else f"cpu: {platform.machine()}"


def peak_memory():
    """(bytes, what was measured): the device allocator's peak where the
    backend reports one, else the process's peak resident memory."""
    import keras

    backend = keras.config.backend()
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                return int(stats["peak_bytes_in_use"]), "device peak"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated()), "device peak"
        else:
            import tensorflow as tf

            if tf.config.list_logical_devices("GPU"):
                info = tf.config.experimental.get_memory_info("GPU:0")
                return int(info["peak"]), "device peak"
    except (RuntimeError, ValueError):
        pass
    return benchmark.peak_rss_bytes(), "host peak RSS (no device allocator)"


def matmul_peak(size, dtype):
    """The backend's matmul FLOP/s in `dtype` on a `size` square product."""
    from keras import ops

    rng = np.random.default_rng(0)
    a = ops.cast(rng.standard_normal((size, size), dtype=np.float32), dtype)

    def product():  # fetch one element: the backend may run asynchronously
        return ops.convert_to_numpy(ops.reshape(ops.matmul(a, a), (-1,))[:1])

    return 2 * size**3 / benchmark.median_seconds(product, 3)


def stage3_training(workload, causal_lm, rows, length, steps, lora):
    """Stage-3 steps (ViT frozen) with the paper's optimiser, with LoRA
    adapters only (`lora=True`) or everything but the ViT trained;
    returns (seconds per step, loss, trained parameters)."""
    import keras

    from keras_qwenvl.training import enable_lora
    from keras_qwenvl.training import recipe_optimizer
    from keras_qwenvl.training import set_stage

    if lora:
        enable_lora(causal_lm, rank=LORA_RANK, alpha=LORA_ALPHA)
    else:
        set_stage(causal_lm, 3)
    causal_lm.compile(
        optimizer=recipe_optimizer(causal_lm, 3, total_steps=steps + 1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    # Loss on the labels outside the image span, logits only there.
    x, y, weights = workload.training_batch(rows, length, length)
    loss = causal_lm.train_on_batch(x, y, sample_weight=weights)  # compiles
    begin = time.perf_counter()
    for _ in range(steps):
        loss = causal_lm.train_on_batch(x, y, sample_weight=weights)
    seconds = (time.perf_counter() - begin) / steps
    trained = sum(int(np.prod(v.shape)) for v in causal_lm.trainable_weights)
    return seconds, float(np.asarray(loss).reshape(-1)[0]), trained


def run(
    config_name,
    train_length,
    train_rows,
    train_steps,
    lora=True,
    new_tokens=NEW_TOKENS,
    dtype="bfloat16",
):
    import keras

    from keras_qwenvl.presets import PUBLISHED_CONFIG

    config = (
        PUBLISHED_CONFIG
        if config_name == "published"
        else benchmark.qwen_vl_config(*TINY)
    )
    workload = benchmark.QwenVLWorkload(config=config)
    report = {
        "backend": keras.config.backend(),
        "device": device_name(),
        "config": config_name,
        "dtype": dtype,
    }
    # Kept unrounded for the utilisation: a CPU without bfloat16 matrix
    # units measures well under 0.01 TFLOP/s.
    peak = matmul_peak(8192 if config_name == "published" else 1024, dtype)
    report["matmul_tflops"] = float(f"{peak / 1e12:.4g}")
    start = time.perf_counter()
    # Decoder blocks rematerialised, as the paper's shapes need (see the
    # README's memory arithmetic); it changes only the training step.
    causal_lm = workload.build(dtype=dtype, remat=True)
    report["parameters"] = int(causal_lm.count_params())
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    memory = {}
    memory["after_build"], report["memory_kind"] = peak_memory()

    # 1. Prefill: the 300-token prompt with its 448x448 image.
    prompt = benchmark.PROMPT_LENGTH
    x = workload.inputs(1, prompt, prompt)
    forward = keras.Model(causal_lm.input, causal_lm.output[:, -1])
    seconds = benchmark.median_seconds(lambda: forward.predict_on_batch(x), 3)
    report["prefill_tokens_per_s"] = round(prompt / seconds, 1)
    memory["after_prefill"], _ = peak_memory()

    # 2. Greedy generation of `new_tokens` tokens.
    report["decode_tokens_per_s"] = {}
    for rows in GENERATE_BATCHES:
        result = benchmark.measure_generation(
            workload, causal_lm, rows, new_tokens, 2, ttft=False
        )
        step = result["step_seconds"]
        report["decode_tokens_per_s"][f"batch_{rows}"] = (
            round(rows / step, 1) if step else None
        )
    memory["after_generation"], _ = peak_memory()

    # 3. Stage-3 training steps, LoRA or the full stage.
    seconds, loss, trained = stage3_training(
        workload, causal_lm, train_rows, train_length, train_steps, lora
    )
    vision = benchmark.qwen_vl_vision_flops(config)
    decoder = benchmark.qwen_vl_flops(config, train_length, train_length) - vision
    # Frozen weights: forward and activation gradients (2 x forward);
    # trained ones add their weight gradients (3 x forward).
    flops = train_rows * (vision + (2 if lora else 3) * decoder)
    report["training"] = {
        "mode": "lora" if lora else "stage3",
        "rows": train_rows,
        "tokens_per_row": train_length,
        "trained_parameters": trained,
        "step_seconds": round(seconds, 3),
        "tokens_per_s": round(train_rows * train_length / seconds, 1),
        "loss": loss,
        "model_tflops_per_step": round(flops / 1e12, 2),
        "mfu": float(f"{flops / seconds / peak:.4g}"),
    }
    memory["after_training"], _ = peak_memory()
    report["peak_memory_gb"] = {k: round(v / 1e9, 2) for k, v in memory.items()}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("published", "tiny"), default="published")
    parser.add_argument("--train-length", type=int, default=None,
                        help="tokens per training row, >= 300 (2048 published, 384 tiny)")
    parser.add_argument("--train-rows", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument(
        "--training",
        choices=("lora", "stage3"),
        default="lora",
        help="LoRA adapters only, or stage 3 in full (everything but the ViT)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=NEW_TOKENS,
        help="greedy tokens per generation, >= 2 (decoding speed is the "
        "time of new_tokens - 1 steps)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="weights and compute (float32: a CPU without bfloat16 matrix "
        "units runs the smoke configuration several times faster)",
    )
    parser.add_argument("--out", default=None, help="folder for result.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2, got {args.new_tokens}")
    length = args.train_length or (2048 if args.config == "published" else 384)
    report = run(
        args.config,
        length,
        args.train_rows,
        args.train_steps,
        lora=args.training == "lora",
        new_tokens=args.new_tokens,
        dtype=args.dtype,
    )
    print(json.dumps(report, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
