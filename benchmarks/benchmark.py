"""Throughput, memory and utilisation of keras_qwenvl on every backend.

One run measures, for each backend (each in its own subprocess with
`KERAS_BACKEND` set) and each configuration:

- the vision encoder, images/s at batch 4;
- prefill, tokens/s over 2 x 512 tokens with one image each and logits at
  every position;
- a training step (AdamW, every weight trainable) on the same batch, tokens/s
  and the peak resident memory of the process; the loss is on the labels
  outside the image span, and Qwen-VL computes logits only there (as
  PaliGemma does, whose image positions precede the text);
- greedy generation after a 300-token prompt with one image: decoding
  tokens/s at batch 1 and 8 and the time to the first token;
- on "small", decoding at batch 1 in float32, bfloat16 and int8
  (`quantize("int8")`);
- the training step again with rematerialised decoder and ViT blocks
  (`QwenVLBackbone(remat=True)`, `vision_encoder.remat = True`, the loss
  `QwenVLCrossEntropy()`), in a process of its own so that its peak memory
  is its own (`--no-remat` skips it);
- keras-hub's PaliGemma at the "small" sizes (random weights) on the same
  workload, as a reference point.

It also measures the machine: float32 matmul GFLOP/s and copy bandwidth, with
numpy here and with each backend's own ops in its subprocess. Model FLOPs
utilisation (MFU) divides analytic FLOPs per second by the larger matmul
peak; the decoding bound divides the weights read per step by the larger
bandwidth. Times are medians over `--repeats` runs after one warm-up run
(which includes compilation).

Usage:

    python benchmarks/benchmark.py --out benchmarks/results
    python benchmarks/benchmark.py --quick --backends jax --configs small \\
        --out /tmp/benchmark

Results go to `results.json`, `results.md` and the subprocesses' `log.txt`
in `--out`.
"""

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import ml_dtypes  # noqa: F401 (lets numpy size bfloat16 variables)
import numpy as np

BACKENDS = ("jax", "torch", "tensorflow")


def qwen_vl_config(
    hidden_size,
    num_layers,
    num_heads,
    intermediate_size,
    vit_width,
    vit_layers,
    vit_heads,
    image_size,
):
    """The published `config.json` with smaller sizes (its vocabulary,
    rotary base, 2048-token `seq_length` and image token ids kept), so the
    model is built by the checkpoint converter's own mapping."""
    from keras_qwenvl.presets import PUBLISHED_CONFIG

    config = copy.deepcopy(PUBLISHED_CONFIG)
    config.update(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        kv_channels=hidden_size // num_heads,
        # Counts both MLP input matrices: each is intermediate_size // 2.
        intermediate_size=intermediate_size,
    )
    config["visual"].update(
        image_size=image_size,
        width=vit_width,
        layers=vit_layers,
        heads=vit_heads,
        output_dim=hidden_size,
    )
    return config


# `qwen_vl_config` arguments of each configuration.
CONFIGS = {
    # 1376-wide MLP matrices (Qwen-7B's ratio), 16 x 16 patches.
    "small": (512, 8, 8, 2752, 256, 6, 4, 224),
    # 2816-wide MLP matrices, 32 x 32 = 1,024 patches.
    "base": (1024, 12, 16, 5632, 512, 12, 8, 448),
}
REFERENCE_CONFIG = "small"  # PaliGemma is measured at these sizes.

VISION_BATCH = 4
PREFILL_ROWS, PREFILL_LENGTH = 2, 512
# Logit slots per row in training: the 252 labels outside the image span.
TRAINING_LOSS_POSITIONS = 256
PROMPT_LENGTH = 300
GENERATE_BATCHES = (1, 8)
TEXT_IDS = 151643  # ordinary (non-special) token ids are below this


# === Timing and memory ===


def median_seconds(fn, repeats):
    """Median wall time of `fn()` over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes():
    """The highest resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux: KiB


def numpy_machine_peaks(quick):
    """float32 matmul GFLOP/s and copy GB/s (read + write) with numpy."""
    n = 2048 if quick else 4096
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    seconds = median_seconds(lambda: a @ a, 3)
    size = (256 if quick else 1024) * 2**20 // 4
    src = np.ones(size, np.float32)
    dst = np.empty_like(src)
    copy_seconds = median_seconds(lambda: np.copyto(dst, src), 3)
    return {
        "matmul_gflops": 2 * n**3 / seconds / 1e9,
        "copy_gbps": 2 * src.nbytes / copy_seconds / 1e9,
    }


def backend_machine_peaks(quick):
    """The same two measurements with the current backend's ops."""
    from keras import ops

    def wait(x):  # the backend may run asynchronously: fetch one element
        return ops.convert_to_numpy(ops.reshape(x, (-1,))[:1])

    n = 2048 if quick else 4096
    rng = np.random.default_rng(0)
    a = ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    seconds = median_seconds(lambda: wait(ops.matmul(a, a)), 3)
    size = (256 if quick else 1024) * 2**20 // 4
    x = ops.ones((size,), "float32")
    copy_seconds = median_seconds(lambda: wait(ops.multiply(x, 1.0)), 3)
    return {
        "matmul_gflops": 2 * n**3 / seconds / 1e9,
        "copy_gbps": 2 * size * 4 / copy_seconds / 1e9,
    }


# === Analytic FLOPs ===


def decoder_flops(
    hidden, layers, attention_width, mlp_width, vocab, positions, logits_at
):
    """Forward FLOPs of one sequence through a decoder: 2 x matmul weights
    x tokens (q, k, v, o and the three MLP matrices), the attention terms
    QK^T and PV (4 x width x positions per token and layer, the full
    square as computed) and the lm_head at `logits_at` positions."""
    per_token = 2 * layers * (4 * hidden * attention_width + 3 * hidden * mlp_width)
    attention = 4 * layers * attention_width * positions * positions
    return per_token * positions + attention + 2 * hidden * vocab * logits_at


def vit_flops(width, layers, mlp_width, patches, patch_size):
    """Forward FLOPs of one image through a ViT trunk."""
    embed = 2 * patches * patch_size * patch_size * 3 * width
    per_layer = 2 * patches * (4 * width * width + 2 * width * mlp_width)
    attention = 4 * patches * patches * width
    return embed + layers * (per_layer + attention)


def qwen_vl_vision_flops(config):
    """One image through the ViT, the adapter's cross-attention of 256
    queries to the patches, and the output projection. The learned
    queries' own projection is the same for every image (computed once per
    batch) and is left out."""
    visual = config["visual"]
    width, d = visual["width"], visual["output_dim"]
    patches = (visual["image_size"] // visual["patch_size"]) ** 2
    queries = visual["n_queries"]
    trunk = vit_flops(
        width,
        visual["layers"],
        int(width * visual["mlp_ratio"]),
        patches,
        visual["patch_size"],
    )
    adapter = (
        2 * patches * width * d  # kv_proj
        + 2 * (queries + 2 * patches) * d * d  # o on queries; k, v on patches
        + 4 * queries * patches * d  # attention
        + 2 * queries * d * d  # proj
    )
    return trunk + adapter


def qwen_vl_flops(config, positions, logits_at):
    """Forward FLOPs of one sample with one image."""
    return qwen_vl_vision_flops(config) + decoder_flops(
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"] * config["kv_channels"],
        config["intermediate_size"] // 2,
        config["vocab_size"],
        positions,
        logits_at,
    )


def paligemma_arguments(config):
    """`PaliGemmaBackbone` arguments at the sizes of a Qwen-VL config."""
    visual = config["visual"]
    return {
        "vocabulary_size": config["vocab_size"],
        "image_size": visual["image_size"],
        "num_layers": config["num_hidden_layers"],
        "num_query_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_attention_heads"],
        "hidden_dim": config["hidden_size"],
        # Gemma halves it for each of its two MLP input matrices too.
        "intermediate_dim": config["intermediate_size"],
        "head_dim": config["kv_channels"],
        "vit_patch_size": visual["patch_size"],
        "vit_num_heads": visual["heads"],
        "vit_hidden_dim": visual["width"],
        "vit_num_layers": visual["layers"],
        "vit_intermediate_dim": int(visual["width"] * visual["mlp_ratio"]),
    }


def paligemma_flops(config, positions, logits_at):
    """Forward FLOPs of one sample: SigLIP trunk and its projection to the
    decoder width, then the decoder over image and text positions."""
    args = paligemma_arguments(config)
    patches = (args["image_size"] // args["vit_patch_size"]) ** 2
    vision = vit_flops(
        args["vit_hidden_dim"],
        args["vit_num_layers"],
        args["vit_intermediate_dim"],
        patches,
        args["vit_patch_size"],
    ) + 2 * patches * args["vit_hidden_dim"] * args["hidden_dim"]
    return vision + decoder_flops(
        args["hidden_dim"],
        args["num_layers"],
        args["num_query_heads"] * args["head_dim"],
        args["intermediate_dim"] // 2,
        args["vocabulary_size"],
        positions,
        logits_at,
    )


def variable_bytes(variables):
    """Bytes of `variables` as stored."""
    return int(
        sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
    )


# === Models under test ===


class QwenVLWorkload:
    """keras_qwenvl's model and inputs: one `<img>` span of 256 positions
    after 10 text tokens, random pixels, random text ids."""

    def __init__(self, config_name=None, config=None):
        """`config_name` from `CONFIGS`, or a published-style `config`."""
        self.config = config or qwen_vl_config(*CONFIGS[config_name])
        self.image_size = self.config["visual"]["image_size"]
        self.rng = np.random.default_rng(0)

    def build(self, dtype=None, **backbone_arguments):
        import keras

        from keras_qwenvl import QwenVLBackbone
        from keras_qwenvl import QwenVLCausalLM
        from keras_qwenvl.convert import convert_backbone_config

        keras.utils.set_random_seed(0)
        backbone = QwenVLBackbone(
            **convert_backbone_config(self.config, dtype=dtype),
            **backbone_arguments,
        )
        return QwenVLCausalLM(backbone)

    def vision_encoder(self, causal_lm):
        import keras

        size = self.image_size
        pixels = keras.Input((size, size, 3))
        encoder = causal_lm.backbone.vision_encoder
        return keras.Model(pixels, encoder(pixels))

    def images(self, count):
        size = self.image_size
        return self.rng.standard_normal((count, size, size, 3), dtype=np.float32)

    def prompt(self, length):
        """Token ids of a `length`-position prompt holding one image span."""
        start = self.config["visual"]["image_start_id"]
        queries = self.config["visual"]["n_queries"]
        span = [start] + [start + 2] * queries + [start + 1]
        text = list(self.rng.integers(0, TEXT_IDS, length - len(span)))
        return text[:10] + span + text[10:]

    def inputs(self, rows, prompt_length, max_length):
        ids = np.zeros((rows, max_length), "int32")
        mask = np.zeros((rows, max_length), "int32")
        for row in range(rows):
            ids[row, :prompt_length] = self.prompt(prompt_length)
            mask[row, :prompt_length] = 1
        images = self.images(rows)[:, None]
        return {"token_ids": ids, "padding_mask": mask, "images": images}

    def flops(self, positions, logits_at):
        return qwen_vl_flops(self.config, positions, logits_at)

    def training_batch(
        self,
        rows=PREFILL_ROWS,
        length=PREFILL_LENGTH,
        loss_positions=TRAINING_LOSS_POSITIONS,
    ):
        """`training_batch` with loss only on labels outside the image span
        (the preprocessor's rule), gathered into `loss_positions` slots per
        row: the model computes logits only there."""
        from keras_qwenvl import select_loss_positions

        x, y, _ = training_batch(self, rows, length)
        start = self.config["visual"]["image_start_id"]
        ids = x["token_ids"]
        in_span = (ids >= start) & (ids <= start + 2)
        weights = ~in_span & ~np.roll(in_span, -1, axis=1)
        weights[:, -1] = False  # its label would wrap around
        return select_loss_positions(
            x, y, weights.astype("float32"), loss_positions
        )

    def decode_bytes(self, causal_lm):
        """Weights read per decoding step: decoder blocks, final norm and
        lm_head (not the input embedding, of which one row is read)."""
        backbone = causal_lm.backbone
        variables = [v for layer in backbone.transformer_layers for v in layer.weights]
        variables += backbone.final_normalization.weights
        variables += [
            v for v in backbone.token_embedding.weights if "reverse" in v.path
        ]
        return variable_bytes(variables)


class PaliGemmaWorkload(QwenVLWorkload):
    """keras-hub's PaliGemma at the same sizes: its 256 image positions
    come before the text, so a sequence of P positions has P - 256 text
    tokens (and logits only there)."""

    def build(self, dtype=None):
        import keras
        import keras_hub

        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.PaliGemmaBackbone(
            **paligemma_arguments(self.config), dtype=dtype
        )
        return keras_hub.models.PaliGemmaCausalLM(preprocessor=None, backbone=backbone)

    def vision_encoder(self, causal_lm):
        return causal_lm.backbone.vit_encoder

    def image_positions(self):
        return (self.image_size // self.config["visual"]["patch_size"]) ** 2

    def inputs(self, rows, prompt_length, max_length):
        """As for Qwen-VL, lengths counting the image positions."""
        image = self.image_positions()
        prompt_length -= image
        max_length -= image
        ids = np.zeros((rows, max_length), "int32")
        mask = np.zeros((rows, max_length), "int32")
        ids[:, :prompt_length] = self.rng.integers(
            0, TEXT_IDS, (rows, prompt_length)
        )
        mask[:, :prompt_length] = 1
        return {
            "token_ids": ids,
            "padding_mask": mask,
            "response_mask": mask.copy(),  # causal over all text
            "images": self.images(rows),
        }

    def flops(self, positions, logits_at):
        return paligemma_flops(self.config, positions, logits_at)

    def training_batch(self):
        """Its logits are only at the text positions already."""
        return training_batch(self)

    def decode_bytes(self, causal_lm):
        backbone = causal_lm.backbone
        variables = [v for layer in backbone.transformer_layers for v in layer.weights]
        variables += backbone.layer_norm.weights
        # Tied embeddings: the lm_head is the embedding table.
        variables += backbone.token_embedding.weights
        return variable_bytes(variables)


WORKLOADS = {"qwenvl": QwenVLWorkload, "paligemma": PaliGemmaWorkload}


# === Measurements (run inside a backend's subprocess) ===


def measure_vision(workload, causal_lm, repeats):
    """The vision encoder alone on a batch of images."""
    model = workload.vision_encoder(causal_lm)
    images = workload.images(VISION_BATCH)
    seconds = median_seconds(lambda: model.predict_on_batch(images), repeats)
    return {"seconds": seconds, "images": VISION_BATCH}


def training_batch(workload, rows=PREFILL_ROWS, length=PREFILL_LENGTH):
    """`rows` x `length` positions (2 x 512 by default) with one image per
    row, next-token labels."""
    x = workload.inputs(rows, length, length)
    y = np.roll(x["token_ids"], -1, axis=1)
    return x, y, np.ones(y.shape, "float32")


def measure_prefill(workload, causal_lm, repeats):
    """One forward pass with the lm_head at every position; the compiled
    function returns each position's max logit so that no (b, t, vocab)
    array is copied back."""
    import keras

    probe = keras.Model(
        causal_lm.input, keras.ops.max(causal_lm.output, axis=-1)
    )
    x, y, _ = training_batch(workload)
    seconds = median_seconds(lambda: probe.predict_on_batch(x), repeats)
    logits_at = y.shape[1]  # text positions
    return {
        "seconds": seconds,
        "tokens": PREFILL_ROWS * PREFILL_LENGTH,
        "flops": PREFILL_ROWS * workload.flops(PREFILL_LENGTH, logits_at),
    }


def measure_training(workload, causal_lm, repeats, loss="auto"):
    """`train_on_batch` with AdamW; every weight is trainable."""
    import keras

    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=loss,
        weighted_metrics=[],
        sampler="greedy",
    )
    x, y, weights = workload.training_batch()
    seconds = median_seconds(
        lambda: causal_lm.train_on_batch(x, y, sample_weight=weights), repeats
    )
    logits_at = y.shape[1]
    return {
        "seconds": seconds,
        "tokens": PREFILL_ROWS * PREFILL_LENGTH,
        "flops": 3 * PREFILL_ROWS * workload.flops(PREFILL_LENGTH, logits_at),
        # Training is the hungriest phase so far: this is its peak.
        "peak_rss_bytes": peak_rss_bytes(),
        "jit_compile": str(getattr(causal_lm, "jit_compile", None)),
    }


def measure_generation(
    workload, causal_lm, rows, new_tokens, repeats, ttft=True, jit_compile=False
):
    """Greedy decoding after a 300-token prompt (`jit_compile`: PyTorch's
    decoding step under `torch.compile`; the warm-up call compiles).

    Two calls share one padded length L = 300 + new_tokens (so one compiled
    function): a 300-token prompt (new_tokens steps) and an (L - 1)-token
    prompt (one step). Both run the same prefill over L positions, so their
    difference is new_tokens - 1 decoding steps. The time to the first
    token is a call with max_length 301 on the 300-token prompt.
    """
    causal_lm.compile(sampler="greedy", jit_compile=jit_compile or "auto")
    length = PROMPT_LENGTH + new_tokens

    def run(prompt, max_length):
        x = workload.inputs(rows, prompt, max_length)
        return median_seconds(
            lambda: causal_lm.generate(x, stop_token_ids=None), repeats
        )

    steps = run(PROMPT_LENGTH, length) - run(length - 1, length)
    result = {
        "rows": rows,
        "new_tokens": new_tokens,
        "step_seconds": steps / (new_tokens - 1) if steps > 0 else None,
        "decode_bytes": workload.decode_bytes(causal_lm),
        "compiled": bool(jit_compile),
    }
    if ttft:
        result["ttft_seconds"] = run(PROMPT_LENGTH, PROMPT_LENGTH + 1)
    return result


def run_worker(spec):
    """Measure one (backend, model, config); returns a JSON-able dict."""
    import keras

    settings = spec["settings"]
    repeats, new_tokens = settings["repeats"], settings["new_tokens"]
    workload = WORKLOADS[spec["model"]](spec["config"])
    result = {
        "backend": keras.config.backend(),
        "model": spec["model"],
        "config": spec["config"],
        "machine": backend_machine_peaks(settings["quick"]),
    }
    if spec.get("remat"):  # the training step alone
        from keras_qwenvl.losses import QwenVLCrossEntropy

        causal_lm = workload.build(remat=True)
        causal_lm.backbone.vision_encoder.remat = True
        result["remat"] = True
        # The lm_head and loss by blocks of positions, each block's logits
        # computed once. `loss="auto"` would compute them twice, a
        # vocabulary block at a time, on JAX (`QwenVLCrossEntropy(remat=
        # True)`): 0.28 GB less and 15% slower here ("small", F).
        result["training"] = measure_training(
            workload, causal_lm, repeats, loss=QwenVLCrossEntropy()
        )
        return result
    causal_lm = workload.build()
    result["parameters"] = int(causal_lm.count_params())
    result["vision"] = measure_vision(workload, causal_lm, repeats)
    result["prefill"] = measure_prefill(workload, causal_lm, repeats)
    result["training"] = measure_training(workload, causal_lm, repeats)
    # keras_qwenvl's PyTorch decoding step compiles with jit_compile=True
    # (keras-hub's PaliGemma has no such path on PyTorch), in float32,
    # int8 (its projections through `narrow_products.int8_projection`, one
    # graph) and bfloat16. On TensorFlow keras_qwenvl's generate()
    # compiles with XLA by default (`QwenVLCausalLM.make_generate_function`);
    # PaliGemma's runs as keras-hub runs it (a TensorFlow graph on a CPU).
    compiled = (
        settings.get("torch_compile", False)
        and result["backend"] == "torch"
        and spec["model"] == "qwenvl"
    )
    result["generation_compiled"] = compiled
    result["generation"] = [
        measure_generation(
            workload, causal_lm, rows, new_tokens, repeats, jit_compile=compiled
        )
        for rows in GENERATE_BATCHES
    ]
    if spec["model"] == "qwenvl" and spec["config"] == REFERENCE_CONFIG:
        def batch_one(model):
            return measure_generation(
                workload, model, 1, new_tokens, repeats, ttft=False,
                jit_compile=compiled,
            )

        precisions = {"float32": result["generation"][0]}
        # Keras collects garbage after each kernel it replaces; leaving the
        # objects that exist now out of those collections saves minutes.
        gc.freeze()
        causal_lm.quantize("int8")
        gc.unfreeze()
        precisions["int8"] = batch_one(causal_lm)
        del causal_lm
        gc.collect()
        precisions["bfloat16"] = batch_one(workload.build(dtype="bfloat16"))
        result["precisions"] = precisions
    return result


# === Driver and report ===


# PyTorch's eager steps allocate their large tensors anew each time, and
# glibc maps every block above 32 MiB afresh and unmaps it when freed: a
# "small" training step faulted in about 7 GB of pages (README, "A
# compilation's freed memory handed back"). With these glibc keeps what
# it frees (no mappings of its own, no trim below 4 GiB) for the next
# step, at the price of a higher peak.
KEEP_FREED_MEMORY = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
)


def worker_environment(backend=None):
    """The environment the workers start with: this one, with glibc's
    malloc on transparent huge pages where glibc has the tunable and the
    user set no `GLIBC_TUNABLES` (the rule and the reason are the main
    job's: `huge_page_environment` in examples/train_synthetic.py; XLA's
    CPU runtime maps its large buffers afresh at every call, and the
    kernel faults them in 4 KiB at a time), PyTorch's also keeping the
    memory it frees (`KEEP_FREED_MEMORY`). `GLIBC_TUNABLES=` opts out."""
    import importlib.util

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "examples",
        "train_synthetic.py",
    )
    spec = importlib.util.spec_from_file_location("train_synthetic", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # its top defines, its main runs nothing
    environ = script.huge_page_environment(
        os.environ, sys.platform, platform.libc_ver()
    )
    if environ is None:
        return dict(os.environ)
    if backend == "torch":
        environ["GLIBC_TUNABLES"] += ":" + KEEP_FREED_MEMORY
    return environ


def run_in_subprocess(backend, spec, log, environ):
    """Runs `run_worker(spec)` under `KERAS_BACKEND=backend`, in `environ`
    (`worker_environment()`)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        env = dict(environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            json.dumps(spec),
            "--worker-out",
            out,
        ]
        completed = subprocess.run(command, env=env, stdout=log, stderr=log)
        if completed.returncode != 0:
            return {"backend": backend, **spec, "error": completed.returncode}
        with open(out) as f:
            return json.load(f)


def capacities(result, machine):
    """FLOP/s and bytes/s of the machine for one worker result: the larger
    of numpy's and the backend's own measurement."""
    return (
        1e9 * max(machine["matmul_gflops"], result["machine"]["matmul_gflops"]),
        1e9 * max(machine["copy_gbps"], result["machine"]["copy_gbps"]),
    )


def derive(result, machine):
    """Rates, MFU and the decoding bandwidth bound of one worker result."""
    peak_flops, bandwidth = capacities(result, machine)
    rows = {}
    if result.get("remat"):
        entry = result["training"]
        return {
            "training_tokens_per_s": entry["tokens"] / entry["seconds"],
            "training_mfu": entry["flops"] / entry["seconds"] / peak_flops,
            "training_peak_rss_gb": entry["peak_rss_bytes"] / 1e9,
        }
    vision = result["vision"]
    rows["vision_images_per_s"] = vision["images"] / vision["seconds"]
    for phase in ("prefill", "training"):
        entry = result[phase]
        rows[f"{phase}_tokens_per_s"] = entry["tokens"] / entry["seconds"]
        rows[f"{phase}_mfu"] = entry["flops"] / entry["seconds"] / peak_flops
    rows["training_peak_rss_gb"] = result["training"]["peak_rss_bytes"] / 1e9

    def decoding(entry):
        step = entry["step_seconds"]
        if step is None:
            return {"tokens_per_s": None, "bandwidth_fraction": None}
        return {
            "tokens_per_s": entry["rows"] / step,
            "bandwidth_fraction": entry["decode_bytes"] / bandwidth / step,
        }

    for entry in result["generation"]:
        rows[f"decode_b{entry['rows']}"] = decoding(entry)
        rows[f"ttft_b{entry['rows']}_ms"] = 1e3 * entry["ttft_seconds"]
    if "precisions" in result:
        rows["precisions"] = {
            name: decoding(entry) for name, entry in result["precisions"].items()
        }
    return rows


# === The goals, against the original code ===

# The original PyTorch code's figures on the goals' anchor machine (2 cores,
# float32 matmul about 190 GFLOP/s, copy about 25 GB/s): vision images/s
# (batch 4), training tokens/s and peak memory (GB), time to the first
# token (ms) and batch-1 decoding tokens/s.
ORIGINAL = {
    "small": {
        "vision": 28.5,
        "training": 127.0,
        "rss_gb": 5.8,
        "ttft_ms": 493.0,
        "decode": 23.6,
    },
    "base": {
        "vision": 0.99,
        "training": 45.5,
        "rss_gb": 13.5,
        "ttft_ms": 2024.0,
        "decode": 11.9,
    },
}


def goals(report):
    """One row per goal and Qwen-VL result: the measured value, its ratio
    to the target's reference, whether the goal is met, and for the
    throughput goals what meeting it asks of this machine: the fraction of
    the matmul peak (vision, training: the FLOPs of the MFU column; first
    token: the image, the decoder over the prompt and one lm_head row) or
    of the memory-bandwidth bound (decoding) at the target rate. Above 1 the
    goal is out of this machine's reach however good the code."""
    machine = report["machine"]
    done = [r for r in report["results"] if "error" not in r]
    reference = {
        (r["backend"], r["config"]): r["derived"]
        for r in done
        if r["model"] == "paligemma"
    }
    rows = []

    def add(result, goal, measured, unit, against, factor, needs=None):
        """`goal` holds where measured / against reaches `factor`: at
        least it, or at most it for a goal that says "<="."""
        ratio = measured / against
        at_most = "<=" in goal
        rows.append(
            {
                "backend": result["backend"],
                "config": result["config"],
                "goal": goal,
                "measured": measured,
                "unit": unit,
                "ratio": ratio,
                "target": f"{'<=' if at_most else '>='} {factor}",
                "met": ratio <= factor if at_most else ratio >= factor,
                "needs": needs,
            }
        )

    for result in done:
        original = ORIGINAL.get(result["config"])
        if result["model"] != "qwenvl" or original is None:
            continue
        d = result["derived"]
        peak_flops, bandwidth = capacities(result, machine)
        training = result["training"]
        per_token = training["flops"] / training["tokens"]
        remat = " (remat)" if result.get("remat") else ""
        rate = d["training_tokens_per_s"]
        add(result, f"training{remat} >= 2x the original", rate, "tok/s",
            original["training"], 2,
            2 * original["training"] * per_token / peak_flops)
        paligemma = reference.get((result["backend"], result["config"]))
        if paligemma:
            add(result, f"training{remat} >= 1.3x PaliGemma", rate, "tok/s",
                paligemma["training_tokens_per_s"], 1.3)
        add(result, f"training{remat} peak memory <= 0.8x the original",
            d["training_peak_rss_gb"], "GB", original["rss_gb"], 0.8)
        if result.get("remat"):
            continue
        config = qwen_vl_config(*CONFIGS[result["config"]])
        add(result, "vision >= 1.5x the original", d["vision_images_per_s"],
            "img/s", original["vision"], 1.5,
            1.5 * original["vision"] * qwen_vl_vision_flops(config)
            / peak_flops)
        # The first token: the image, the decoder over the padded length
        # (prompt + 1) and the lm_head at one position.
        first_token_flops = qwen_vl_flops(config, PROMPT_LENGTH + 1, 1)
        add(result, "first token <= 0.4x the original", d["ttft_b1_ms"],
            "ms", original["ttft_ms"], 0.4,
            first_token_flops / (0.4e-3 * original["ttft_ms"]) / peak_flops)
        b1 = d["decode_b1"]
        if b1["tokens_per_s"] is None:
            continue
        speed = b1["tokens_per_s"]
        add(result, "batch-1 decoding >= 2x the original", speed, "tok/s",
            original["decode"], 2,
            2 * original["decode"] * result["generation"][0]["decode_bytes"]
            / bandwidth)
        add(result, "batch-1 decoding >= 0.85 of the bandwidth bound",
            speed, "tok/s", speed / b1["bandwidth_fraction"], 0.85)
        precisions = d.get("precisions", {})
        float32 = precisions.get("float32", {}).get("tokens_per_s")
        for name, factor in (("int8", 1.5), ("bfloat16", 1.3)):
            lower = precisions.get(name, {}).get("tokens_per_s")
            if float32 and lower:
                add(result, f"{name} decoding >= {factor}x float32", lower,
                    "tok/s", float32, factor)
    return rows


def goals_markdown(rows):
    lines = [
        "Goals against the original code's figures (measured on a 2-core "
        "machine with a float32 matmul peak of about 190 GFLOP/s and 25 "
        "GB/s of copy bandwidth). 'Needs': the fraction of this machine's "
        "matmul peak (vision, training, first token: the FLOPs the "
        "computation runs) or of its bandwidth bound (decoding) that the "
        "target asks for; above 1 the target is out of reach here.",
        "",
        "| backend | config | goal | measured | ratio | met | needs |",
        "|" + " --- |" * 7,
    ]
    for row in rows:
        needs = "" if row["needs"] is None else f"{row['needs']:.2f}"
        lines.append(
            f"| {row['backend']} | {row['config']} | {row['goal']} |"
            f" {fmt(row['measured'], 2 if row['unit'] == 'GB' else 1)}"
            f" {row['unit']} | {row['ratio']:.2f} ({row['target']}) |"
            f" {'yes' if row['met'] else 'no'} | {needs} |"
        )
    return lines


def fmt(value, digits=1):
    """A rate or size for the table ('n/a' when not measured)."""
    return "n/a" if value is None else f"{value:,.{digits}f}"


def words(items):
    """"a", "a and b", "a, b and c"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def fraction(value):
    """A utilisation fraction for the table."""
    return "n/a" if value is None else f"{value:.2f}"


def markdown(report):
    machine = report["machine"]
    lines = [
        "## keras_qwenvl benchmark",
        "",
        f"Host: {machine['host']}; numpy float32 matmul "
        f"{machine['matmul_gflops']:,.0f} GFLOP/s, copy "
        f"{machine['copy_gbps']:,.1f} GB/s. Medians of {report['repeats']} "
        f"runs after a warm-up; {report['new_tokens']} new tokens per "
        "generation. Workers' GLIBC_TUNABLES: "
        f"{machine.get('glibc_tunables')!r}"
        + (
            f" (PyTorch's: {machine['glibc_tunables_torch']!r})"
            if machine.get("glibc_tunables_torch")
            not in (None, machine.get("glibc_tunables"))
            and "torch" in {r["backend"] for r in report["results"]}
            else ""
        )
        + ".",
        "",
        "| backend | model | config | matmul GFLOP/s | copy GB/s | vision img/s | "
        "prefill tok/s (MFU) | train tok/s (MFU) | train peak RSS GB | "
        "decode b1 tok/s (BW) | decode b8 tok/s (BW) | TTFT b1 ms | "
        "TTFT b8 ms |",
        "|" + " --- |" * 13,
    ]
    precision_lines, remat_lines = [], []
    for result in report["results"]:
        head = f"| {result['backend']} | {result['model']} | {result['config']} |"
        if result.get("remat") and "error" not in result:
            d = result["derived"]
            remat_lines.append(
                f"| {result['backend']} | {result['config']} |"
                f" {fmt(d['training_tokens_per_s'], 0)}"
                f" ({fraction(d['training_mfu'])}) |"
                f" {fmt(d['training_peak_rss_gb'], 2)} |"
            )
            continue
        if "error" in result:
            lines.append(head + f" failed (exit {result['error']}, see log) |")
            continue
        d = result["derived"]
        b1, b8 = d["decode_b1"], d["decode_b8"]
        lines.append(
            head
            + f" {fmt(result['machine']['matmul_gflops'], 0)} |"
            + f" {fmt(result['machine']['copy_gbps'])} |"
            + f" {fmt(d['vision_images_per_s'])} |"
            + f" {fmt(d['prefill_tokens_per_s'], 0)}"
            + f" ({fraction(d['prefill_mfu'])}) |"
            + f" {fmt(d['training_tokens_per_s'], 0)}"
            + f" ({fraction(d['training_mfu'])}) |"
            + f" {fmt(d['training_peak_rss_gb'], 2)} |"
            + f" {fmt(b1['tokens_per_s'])} ({fraction(b1['bandwidth_fraction'])}) |"
            + f" {fmt(b8['tokens_per_s'])} ({fraction(b8['bandwidth_fraction'])}) |"
            + f" {fmt(d['ttft_b1_ms'], 0)} | {fmt(d['ttft_b8_ms'], 0)} |"
        )
        for name, entry in d.get("precisions", {}).items():
            precision_lines.append(
                f"| {result['backend']} | {result['config']} | {name} |"
                f" {fmt(entry['tokens_per_s'])} |"
                f" {fraction(entry['bandwidth_fraction'])} |"
            )
    if precision_lines:
        lines += [
            "",
            "Decoding at batch 1 by weight precision:",
            "",
            "| backend | config | weights | decode tok/s | fraction of BW bound |",
            "|" + " --- |" * 5,
        ] + precision_lines
    if remat_lines:
        lines += [
            "",
            "Training with rematerialised decoder and ViT blocks "
            "(`QwenVLBackbone(remat=True)`, `vision_encoder.remat = True`, "
            "`loss=QwenVLCrossEntropy()`, a process of its own):",
            "",
            "| backend | config | train tok/s (MFU) | train peak RSS GB |",
            "|" + " --- |" * 4,
        ] + remat_lines
    if any(result.get("generation_compiled") for result in report["results"]):
        # Older runs compiled float32 only, later ones bfloat16 too, and
        # int8 since its projections trace into one graph.
        compiled, eager = ["float32"], []
        for precision in ("int8", "bfloat16"):
            was = any(
                result["precisions"][precision].get("compiled", False)
                for result in report["results"]
                if result.get("generation_compiled") and "precisions" in result
            )
            (compiled if was else eager).append(precision)
        eager.append("PaliGemma")
        lines += [
            "",
            f"PyTorch: keras_qwenvl's {words(compiled)} generation "
            "ran with `jit_compile=True` (the decoding step under "
            f"`torch.compile`; {words(eager)} eagerly).",
        ]
    lines += [
        "",
        "MFU: analytic model FLOPs per second / the larger matmul peak "
        "(numpy or the backend). BW: (bytes of decoder blocks + lm_head) / "
        "the larger copy bandwidth, divided by the measured step time.",
    ]
    goal_rows = goals(report)
    if goal_rows:
        lines += [""] + goals_markdown(goal_rows)
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated subset of jax,torch,tensorflow",
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated subset of " + ",".join(CONFIGS),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, fewer new tokens, smaller machine probes",
    )
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--new-tokens", type=int, help="tokens per generation")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip keras-hub PaliGemma"
    )
    parser.add_argument(
        "--no-remat",
        action="store_true",
        help="skip the training step with rematerialised blocks",
    )
    parser.add_argument(
        "--no-torch-compile",
        action="store_true",
        help="PyTorch: generate eagerly (by default keras_qwenvl's float32, "
        "int8 and bfloat16 generation compiles its decoding step, "
        "jit_compile=True)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rewrite results.md (and the derived numbers "
        "in results.json) from the results.json already in --out",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, allowed in (("backends", BACKENDS), ("configs", tuple(CONFIGS))):
        chosen = getattr(args, name).split(",")
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(
                f"--{name}: unknown {unknown}; choose from {', '.join(allowed)}"
            )
        setattr(args, name, chosen)
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return
    if args.render:
        with open(os.path.join(args.out, "results.json")) as f:
            report = json.load(f)
        for result in report["results"]:
            if "error" not in result:
                result["derived"] = derive(result, report["machine"])
        write_report(report, args.out)
        return
    settings = {
        "quick": args.quick,
        "repeats": args.repeats or (2 if args.quick else 5),
        "new_tokens": args.new_tokens or (8 if args.quick else 64),
        "torch_compile": not args.no_torch_compile,
    }
    os.makedirs(args.out, exist_ok=True)
    machine = numpy_machine_peaks(args.quick)
    machine["host"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    environ = {
        backend: worker_environment(backend) for backend in args.backends
    }
    machine["glibc_tunables"] = worker_environment().get("GLIBC_TUNABLES")
    machine["glibc_tunables_torch"] = worker_environment("torch").get(
        "GLIBC_TUNABLES"
    )
    print(
        f"numpy: matmul {machine['matmul_gflops']:,.0f} GFLOP/s, "
        f"copy {machine['copy_gbps']:,.1f} GB/s; workers' GLIBC_TUNABLES: "
        f"{machine['glibc_tunables']!r}",
        flush=True,
    )
    specs = [{"model": "qwenvl", "config": name} for name in args.configs]
    if not args.no_remat:
        specs += [
            {"model": "qwenvl", "config": name, "remat": True}
            for name in args.configs
        ]
    if REFERENCE_CONFIG in args.configs and not args.no_reference:
        specs.append({"model": "paligemma", "config": REFERENCE_CONFIG})
    results = []
    with open(os.path.join(args.out, "log.txt"), "w") as log:
        for backend in args.backends:
            for spec in specs:
                remat = " (remat)" if spec.get("remat") else ""
                print(
                    f"{backend}: {spec['model']} {spec['config']}{remat}",
                    flush=True,
                )
                result = run_in_subprocess(
                    backend,
                    {**spec, "settings": settings},
                    log,
                    environ[backend],
                )
                if "error" not in result:
                    result["derived"] = derive(result, machine)
                results.append(result)
    write_report({"machine": machine, **settings, "results": results}, args.out)


def write_report(report, out):
    """results.json (with the goals' rows) and results.md in `out`."""
    report["goals"] = goals(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
