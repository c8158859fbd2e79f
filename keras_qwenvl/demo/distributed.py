"""Train Qwen-VL on a device mesh with `keras.distribution` (JAX).

    # 8 accelerators as 4-way data x 2-way model parallel, the 9.6B model:
    python examples/train_distributed.py --config 7b --mesh 4,2 --stage 3 \\
        --precision mixed_bfloat16 --batch-size 8 --accumulation 16

    # The same on 8 simulated CPU devices with a tiny model (a smoke run):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/train_distributed.py --config tiny --mesh 4,2

(`KERAS_BACKEND=jax python -m keras_qwenvl.demo.distributed` is the same
script where only the package is installed.)

`--simulate-cpu-devices 8` sets that XLA flag itself. JAX fixes its device
count when its backend starts (the first device query), so the flag must be
set before that; importing JAX or Keras does not start it.

The mesh is `(data, model)`: batches are split over the data axis, and the
attention heads, MLP units and vocabulary of every weight over the model
axis (`keras_qwenvl.distribution`); a model axis of 1 is plain data
parallelism (`keras.distribution.DataParallel`). The training data is
synthetic (`keras_qwenvl.data.synthetic`), with the stage's tasks as in
the synthetic demo (`keras_qwenvl.demo.synthetic`), and the model trains with `fit()`.

`--config 7b` builds the published architecture (remat on). With
`KERAS_QWENVL_QWEN_VL_7B` pointing at the downloaded checkpoint it loads its
weights (each tensor is read on the host and split over the devices as it
is assigned) and tokenizer; without it the weights are random and the
tokenizer byte-level.
"""

import argparse
import json
import math
import os
import tempfile
import time

# A model that a model axis of 1, 2 or 4 splits everywhere (4 heads in
# every attention); on an 8-way axis its heads and ViT MLP (84) stay whole.
TINY = dict(
    image_size=56,
    num_queries=4,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    vision_mlp=84,
    hidden_dim=64,
    num_layers=2,
    num_heads=4,
    intermediate_dim=96,
    vocabulary_size=480,  # the byte-level tokenizer's 473 ids, padded
    sequence_length=256,
)
# Stage 2 packs rows; each image slot costs a ViT pass.
PACKED_IMAGE_SLOTS = 3


def parse_mesh(text):
    """'4,2' -> (4, 2): data and model axis sizes."""
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            "--mesh takes two positive sizes 'data,model', e.g. 4,2; got "
            f"{text!r}"
        )
    return shape


def byte_level_preprocessor(num_queries, image_size, sequence_length):
    """A preprocessor whose vocabulary needs no download."""
    from keras_qwenvl import QwenVLCausalLMPreprocessor
    from keras_qwenvl import QwenVLImageConverter
    from keras_qwenvl import QwenVLTokenizer
    from keras_qwenvl.tokenizer import write_byte_level_vocabulary

    vocabulary = write_byte_level_vocabulary(
        os.path.join(tempfile.mkdtemp(), "qwen.tiktoken")
    )
    return QwenVLCausalLMPreprocessor(
        QwenVLTokenizer(vocabulary, image_span_length=num_queries),
        QwenVLImageConverter(image_size=(image_size, image_size)),
        sequence_length=sequence_length,
    )


def build_tiny(sequence_length):
    from keras_qwenvl import QwenVLBackbone
    from keras_qwenvl import QwenVLCausalLM
    from keras_qwenvl import QwenVLVisionEncoder

    t = TINY
    preprocessor = byte_level_preprocessor(
        t["num_queries"], t["image_size"], sequence_length
    )
    encoder = QwenVLVisionEncoder(
        image_size=t["image_size"],
        patch_size=14,
        width=t["vision_width"],
        num_layers=t["vision_layers"],
        num_heads=t["vision_heads"],
        intermediate_dim=t["vision_mlp"],
        output_dim=t["hidden_dim"],
        num_queries=t["num_queries"],
        adapter_head_dim=t["hidden_dim"] // 4,
    )
    backbone = QwenVLBackbone(
        vocabulary_size=t["vocabulary_size"],
        num_layers=t["num_layers"],
        num_heads=t["num_heads"],
        hidden_dim=t["hidden_dim"],
        intermediate_dim=t["intermediate_dim"],
        seq_length=sequence_length,
        image_start_token_id=preprocessor.tokenizer.image_start_token_id,
        vision_encoder=encoder,
    )
    return QwenVLCausalLM(backbone, preprocessor=preprocessor)


def build_7b(sequence_length):
    from keras_qwenvl import QwenVLBackbone
    from keras_qwenvl import QwenVLCausalLM
    from keras_qwenvl import QwenVLCausalLMPreprocessor
    from keras_qwenvl.presets import preset_folder

    has_weights = preset_folder("qwen_vl_7b") is not None
    backbone = QwenVLBackbone.from_preset(
        "qwen_vl_7b", load_weights=has_weights, remat=True
    )
    if has_weights:
        preprocessor = QwenVLCausalLMPreprocessor.from_preset(
            "qwen_vl_7b", sequence_length=sequence_length
        )
    else:
        encoder = backbone.vision_encoder
        preprocessor = byte_level_preprocessor(
            encoder.num_queries, encoder.image_size, sequence_length
        )
    return QwenVLCausalLM(backbone, preprocessor=preprocessor)


def make_distribution(mesh):
    """DataParallel for a model axis of 1, else a checked ModelParallel."""
    import keras

    from keras_qwenvl.distribution import model_parallel

    devices = keras.distribution.list_devices()
    if math.prod(mesh) != len(devices):
        raise ValueError(
            f"--mesh {mesh[0]},{mesh[1]} needs {math.prod(mesh)} devices; "
            f"there are {len(devices)} ({devices[0].split(':')[0]}). On CPU, "
            "simulate more with --simulate-cpu-devices N."
        )
    if mesh[1] == 1:
        return keras.distribution.DataParallel(devices=devices)
    return model_parallel(mesh)


def weight_bytes(model, distribution):
    """(bytes of weights per device, in all), from the variables' layouts."""
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    per_device = total = 0
    for weight in model.weights:
        # Float dtypes end with their width in bits ("bfloat16").
        size = math.prod(weight.shape) * int(weight.dtype[-2:]) // 8
        layout = distribution.get_variable_layout(weight)
        per_device += size / math.prod(sizes[a] for a in layout.axes if a)
        total += size
    return per_device, total


def run(args):
    import keras

    from keras_qwenvl.data.loader import QwenVLDataLoader
    from keras_qwenvl.data.synthetic import STAGE_TASKS
    from keras_qwenvl.data.synthetic import SyntheticSource
    from keras_qwenvl.distribution import memory_estimate
    from keras_qwenvl.presets import PUBLISHED_CONFIG
    from keras_qwenvl.training import recipe_optimizer
    from keras_qwenvl.training import set_stage

    if keras.config.backend() != "jax":
        raise SystemExit(
            "keras.distribution is implemented for JAX only; run with "
            "KERAS_BACKEND=jax (see the README for PyTorch and TensorFlow)."
        )
    if args.batch_size % args.mesh[0]:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be a multiple of the data "
            f"axis ({args.mesh[0]}): each data shard takes an equal part."
        )
    keras.config.set_dtype_policy(args.precision)
    keras.utils.set_random_seed(args.seed)
    distribution = make_distribution(args.mesh)
    if args.sequence_length:
        sequence_length = args.sequence_length
    elif args.config == "tiny":
        sequence_length = TINY["sequence_length"]
    else:  # the paper's
        sequence_length = 512 if args.stage == 1 else 2048
    start = time.time()
    with distribution.scope():
        build = build_tiny if args.config == "tiny" else build_7b
        model = build(sequence_length)
        set_stage(model, args.stage)
        optimizer = recipe_optimizer(
            model,
            args.stage,
            total_steps=args.steps,
            gradient_accumulation_steps=(
                args.accumulation if args.accumulation > 1 else None
            ),
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        micro_batches = args.steps * args.accumulation
        source = SyntheticSource(
            micro_batches * args.batch_size,
            seed=args.seed,
            tasks=STAGE_TASKS[args.stage],
            image_size=model.backbone.vision_encoder.image_size,
        )
        loader = QwenVLDataLoader(
            source,
            model.preprocessor,
            batch_size=args.batch_size,
            pack=args.stage == 2,
            max_images=PACKED_IMAGE_SLOTS if args.stage == 2 else None,
            repeat=True,
            seed=args.seed,
        )
        history = model.fit(
            loader.dataset(), epochs=1, steps_per_epoch=micro_batches
        )
    published = memory_estimate(
        PUBLISHED_CONFIG, args.stage, math.prod(args.mesh), args.precision
    )
    per_device, total = weight_bytes(model, distribution)
    summary = {
        "mesh": {"data": args.mesh[0], "model": args.mesh[1]},
        "distribution": type(distribution).__name__,
        "parameters": model.count_params(),
        "weight_bytes_per_device": per_device,
        "weight_bytes_total": total,
        "loss": history.history["loss"],
        "seconds": round(time.time() - start, 1),
        "published_model_estimate_gb_per_device": {
            "state": round(published["state"] / 1e9, 1),
            "activations_per_sample": round(
                published["activations_per_sample"] / 1e9, 2
            ),
            "max_batch_size_on_80gb": published["max_batch_size"],
        },
    }
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        default=(4, 2),
        help="data,model axis sizes (default 4,2)",
    )
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3)
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "mixed_bfloat16"),
        default="mixed_bfloat16",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="global micro-batch, split over the data axis",
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per optimizer update",
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="optimizer updates"
    )
    parser.add_argument("--config", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--sequence-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--simulate-cpu-devices",
        type=int,
        default=None,
        help="split the CPU into N JAX devices (sets XLA_FLAGS)",
    )
    args = parser.parse_args(argv)
    if args.simulate_cpu_devices:
        flag = "--xla_force_host_platform_device_count"
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} "
            f"{flag}={args.simulate_cpu_devices}"
        )
    return run(args)


if __name__ == "__main__":
    main()
