"""Train a small Qwen-VL from scratch on built-in synthetic data.

    python examples/train_synthetic.py              # the full demo
    python examples/train_synthetic.py --quick      # a CI-sized smoke run
    KERAS_BACKEND=jax python -m keras_qwenvl.demo.synthetic  # the same

First the vision encoder is pre-trained on its own (the paper starts from
a pre-trained ViT): a dense head on each of its output tokens names the
colour and kind of the shape, or the word, at that token's place and its
box (`pretrain_vision`, `keras_qwenvl.data.synthetic.place_labels`). Then
the paper's three stages with `model.fit()`: stage 1 trains the vision
encoder and adapter on captions with the language model frozen, stage 2
trains everything on the multi-task mixture (captions, grounded captions,
referring grounding, VQA, OCR with quads, text) packed into fixed-length
rows, stage 3 freezes the ViT and tunes adapter and language model on
multi-turn chats mixed with the tasks. The data is drawn on the fly
(`keras_qwenvl.data.synthetic`): shapes of random colour, size and place
(on the ViT's patch grid, see `Settings.on_patch_grid`), and words of one
font size rendered at random places (on the grid) and angles over textured
paper. The vocabulary is byte-level with
the Qwen special tokens, so nothing is downloaded; the words the synthetic
texts use are single tokens of it (byte-pair merges), so that a caption is
a few tokens and its colour and shape words carry most of its loss.

Then held-out images are scored with greedy generation:
- grounding accuracy: `<img></img><ref>the red circle</ref>` -> the first
  box parsed from the output, a hit when IoU >= 0.5 with the true box;
- OCR word accuracy: `OCR with grounding:` -> the `<ref>` words, the
  fraction of true words read at their place in reading order;
- caption exact match: `Generate the caption in English:`.

Written to `--out`: the Keras preset, `metrics.json` (scores, wall time,
settings), `boxes.png` (held-out images with true boxes in green and
predicted ones in red, with their phrases) and `loss.png`.
"""

import argparse
import dataclasses
import json
import os
import re
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw


def _stage_tasks():
    from keras_qwenvl.data.synthetic import STAGE_TASKS

    return {stage: dict(tasks) for stage, tasks in STAGE_TASKS.items()}


@dataclasses.dataclass
class Settings:
    """Everything that defines a run (recorded in metrics.json)."""

    image_size: int = 112
    patch_size: int = 14
    num_queries: int = 36
    vision_width: int = 128
    vision_layers: int = 4
    hidden_dim: int = 256
    num_layers: int = 4
    head_dim: int = 64
    sequence_length: int = 256
    batch_size: int = 16
    stage_steps: tuple = (30, 600, 60)
    peak_learning_rate: tuple = (1e-3, 1e-3, 5e-4)
    # From scratch every ViT layer learns at the full rate (the paper's 0.95
    # layer decay is for fine-tuning a pretrained ViT).
    layer_decay: float = 1.0
    # The vision encoder (ViT and adapter) learns at this fraction of the
    # stage's rate: at the decoder's rate the adapter's cross-attention
    # stops passing shape information on, and after the vision pre-training
    # a low rate keeps what it learned (docs/main_job.md).
    vision_learning_rate_multiplier: float = 0.05
    # Shapes are drawn with sides and places on the ViT's patch grid, and
    # words start on it (False: anywhere), so that each patch holds one
    # part of a shape or word in a fixed position; a from-scratch ViT
    # learns shapes several times faster so, and words only so.
    on_patch_grid: bool = True
    # The words' font size (a fraction of the image height, min and max)
    # and largest angle in degrees. A from-scratch ViT learns to read words
    # of one size within minutes, not words of several (docs/main_job.md).
    font_size: tuple = (0.16, 0.16)
    max_angle: float = 10.0
    # Referring-grounding training samples put the phrase in the response
    # (`<img></img><ref>` -> `the red circle</ref><box>...</box>`), so that
    # the loss is on it too; held-out prompts are the original's
    # `<img></img><ref>the red circle</ref>`, the same tokens. The decoder
    # then finds the named one of several shapes far more often
    # (docs/main_job.md).
    grounding_phrase_in_response: bool = True
    # The shapes of one image have distinct colours (`SyntheticConfig(
    # distinct_colors=True)`), so that a colour names one shape: with a
    # colour shared by two shapes, captions were right on 0.14 of the
    # images against 0.72 / 0.57 with 2 / 3 distinct colours
    # (docs/main_job.md).
    distinct_colors: bool = True
    # Loss weights of each task's target tokens in the stages
    # (`QwenVLDataLoader(task_loss_weights=...)`; 1 for a task not named).
    # A caption is a few tokens against an OCR sample's ~90: at weight 1
    # and the earlier mixture captions carried ~3% of the stage-2 loss
    # (docs/main_job.md, "The mixture").
    task_loss_weights: dict = dataclasses.field(
        default_factory=lambda: {"caption": 2.0}
    )
    # A factor on the loss weight of the words inside `<ref>...</ref>`
    # (`QwenVLDataLoader(phrase_loss_weight=...)`): an OCR sample's words
    # are 2% of its target tokens and carried 6% of its loss, its quads'
    # digits (uncertain to a pixel) the rest. At 1 the decoder learned to
    # read only at a threshold of OCR's share of the loss, and a change
    # of float rounding moved OCR from 0.63 to 0.44; at 5 it reads 0.9
    # (docs/main_job.md, "Reading: the words' share of the loss").
    phrase_loss_weight: float = 5.0
    # Each stage's task mixture, {stage: {task: parts}} (the probe batch
    # is drawn from stage 2's); `keras_qwenvl.data.synthetic.STAGE_TASKS`
    # by default.
    stage_tasks: dict = dataclasses.field(default_factory=_stage_tasks)
    # From scratch, the ViT's position table starts as a 2D sin-cos table
    # and each adapter query starts biased towards its own place
    # (`QwenVLVisionEncoder(spatial_start=True)`).
    spatial_start: bool = True
    # Before stage 1 the vision encoder learns, with a dense head on each of
    # its output tokens, the colour and kind of the shape, or the word, at
    # that token's place and its box (the paper starts from a pre-trained
    # ViT; end to end a from-scratch encoder learns neither places nor
    # words within the budget).
    vision_pretraining_steps: int = 2400
    vision_pretraining_learning_rate: float = 5e-4
    # The share of OCR images (the rest are shapes images) in it.
    vision_pretraining_ocr_share: float = 0.5
    # Image slots per packed row: each slot costs a ViT pass, used or not.
    max_images_per_row: int = 3
    eval_images: int = 200
    eval_batch: int = 50
    # The data's words as single tokens of the byte-level vocabulary.
    word_tokens: bool = True
    seed: int = 0


QUICK = dict(
    vision_layers=2,
    hidden_dim=128,
    num_layers=2,
    batch_size=8,
    stage_steps=(4, 12, 4),
    vision_pretraining_steps=4,
    eval_images=8,
    eval_batch=8,
)


def build_model(settings, vocabulary_dir):
    import keras

    from keras_qwenvl import QwenVLBackbone
    from keras_qwenvl import QwenVLCausalLM
    from keras_qwenvl import QwenVLCausalLMPreprocessor
    from keras_qwenvl import QwenVLImageConverter
    from keras_qwenvl import QwenVLTokenizer
    from keras_qwenvl import QwenVLVisionEncoder
    from keras_qwenvl.data.synthetic import vocabulary_words
    from keras_qwenvl.tokenizer import write_byte_level_vocabulary

    keras.utils.set_random_seed(settings.seed)
    vocabulary = write_byte_level_vocabulary(
        os.path.join(vocabulary_dir, "qwen.tiktoken"),
        words=vocabulary_words() if settings.word_tokens else (),
    )
    tokenizer = QwenVLTokenizer(
        vocabulary, image_span_length=settings.num_queries
    )
    s = settings
    encoder = QwenVLVisionEncoder(
        image_size=s.image_size,
        patch_size=s.patch_size,
        width=s.vision_width,
        num_layers=s.vision_layers,
        num_heads=s.vision_width // 32,
        intermediate_dim=4 * s.vision_width,
        output_dim=s.hidden_dim,
        num_queries=s.num_queries,
        adapter_head_dim=64,
        spatial_start=s.spatial_start,
    )
    backbone = QwenVLBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=s.num_layers,
        num_heads=s.hidden_dim // s.head_dim,
        hidden_dim=s.hidden_dim,
        intermediate_dim=int(s.hidden_dim * 8 / 3),
        seq_length=s.sequence_length,
        image_start_token_id=tokenizer.image_start_token_id,
        vision_encoder=encoder,
    )
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer,
        QwenVLImageConverter(image_size=(s.image_size, s.image_size)),
        sequence_length=s.sequence_length,
    )
    return QwenVLCausalLM(backbone=backbone, preprocessor=preprocessor)


def data_config(settings):
    """`SyntheticConfig` fields of the run's data (training and held-out)."""
    grid = settings.patch_size if settings.on_patch_grid else None
    return {
        "image_size": settings.image_size,
        "grid": grid,
        "font_size": tuple(settings.font_size),
        "max_angle": settings.max_angle,
        "grounding_phrase_in_response": settings.grounding_phrase_in_response,
        "distinct_colors": settings.distinct_colors,
    }


def learning_rate_multipliers(model, settings):
    """Per-weight learning-rate multipliers of every stage: the ViT's
    layer decay, and the vision encoder's share of the stage's rate."""
    from keras_qwenvl.training import vit_layer_decay_multipliers

    multipliers = vit_layer_decay_multipliers(model, settings.layer_decay)
    scale = settings.vision_learning_rate_multiplier
    if scale != 1.0:
        encoder = re.escape(model.backbone.vision_encoder.path)
        # The first matching pattern wins: fold the share into each ViT
        # layer's decay, then cover the rest of the encoder.
        multipliers = [(p, m * scale) for p, m in multipliers]
        multipliers.append(("^" + encoder + "/", scale))
    return multipliers


def step_losses():
    """A callback collecting per-step losses (`.values`), recovered from
    Keras' running mean."""
    import keras

    class Losses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.values = []
            self.mean = 0.0

        def on_train_batch_end(self, batch, logs=None):
            mean = float(logs["loss"])
            self.values.append((batch + 1) * mean - batch * self.mean)
            self.mean = mean

    return Losses()


def pretrain_vision(model, settings):
    """Stage 0: the vision encoder learns what lies where.

    A dense head on each of the encoder's output tokens (one per adapter
    query, on a lattice over the image) names what lies at that query's
    place (`place_labels`): the colour and kind of a shape, or a word, and
    its box in cells, on shapes and OCR images drawn on the fly; AdamW with
    the recipe's betas, a linear warm-up and a cosine decay. The heads are
    dropped afterwards.

    Returns:
        The per-step losses (the sum over the labels).
    """
    import keras

    from keras_qwenvl.data.synthetic import SyntheticConfig
    from keras_qwenvl.data.synthetic import SyntheticSource
    from keras_qwenvl.data.synthetic import place_label_sizes
    from keras_qwenvl.data.synthetic import place_labels

    steps = settings.vision_pretraining_steps
    if not steps:
        return []
    encoder = model.backbone.vision_encoder
    converter = model.preprocessor.image_converter
    config = SyntheticConfig(**data_config(settings))
    grid = int(round(settings.num_queries**0.5))
    cell = settings.patch_size
    sizes = place_label_sizes(config, cell)
    batch_size = settings.batch_size
    # Shapes images (drawn for captions) and OCR images.
    share = settings.vision_pretraining_ocr_share
    tasks = {"caption": 1 - share, "ocr": share} if share else "caption"
    source = SyntheticSource(
        steps * batch_size,
        seed=settings.seed * 1000,
        tasks=tasks,
        config=config,
    )

    class Batches(keras.utils.PyDataset):
        # Two threads draw the next batches while the step runs (in the
        # order `fit` shuffles them into, as drawn one by one).
        def __init__(self):
            super().__init__(workers=2)

        def __len__(self):
            return steps

        def __getitem__(self, index):
            examples = [
                source[index * batch_size + i] for i in range(batch_size)
            ]
            images = np.stack([e["images"][0] for e in examples])
            labels = [
                place_labels(e["meta"], config, grid, cell) for e in examples
            ]
            return (
                keras.ops.convert_to_numpy(converter(images)),
                {n: np.stack([lab[n] for lab in labels]) for n in sizes},
            )

    size = settings.image_size
    inputs = keras.Input((size, size, 3))
    tokens = encoder(inputs)
    heads = keras.Model(
        inputs,
        {n: keras.layers.Dense(k, name=n)(tokens) for n, k in sizes.items()},
    )
    rate = settings.vision_pretraining_learning_rate
    schedule = keras.optimizers.schedules.CosineDecay(
        rate / 20,
        steps,
        alpha=0.05,
        warmup_target=rate,
        warmup_steps=max(1, steps // 20),
    )
    heads.compile(
        optimizer=keras.optimizers.AdamW(
            schedule,
            weight_decay=0.05,
            beta_1=0.9,
            beta_2=0.98,
            epsilon=1e-6,
            global_clipnorm=1.0,
        ),
        loss={
            n: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            for n in sizes
        },
    )
    losses = step_losses()
    print(f"\nVision pre-training: {steps} steps, labels {list(sizes)}")
    heads.fit(Batches(), epochs=1, callbacks=[losses])
    return losses.values


def stage_loader(model, settings, stage, steps):
    """The loader of a stage's training data: `steps` batches of the
    stage's mixture drawn on the fly, packed in stage 2, repeating."""
    from keras_qwenvl.data.loader import QwenVLDataLoader
    from keras_qwenvl.data.synthetic import SyntheticSource

    source = SyntheticSource(
        steps * settings.batch_size * 4,
        seed=settings.seed * 1000 + stage,
        tasks=settings.stage_tasks[stage],
        **data_config(settings),
    )
    return QwenVLDataLoader(
        source,
        model.preprocessor,
        batch_size=settings.batch_size,
        pack=stage == 2,
        max_images=settings.max_images_per_row if stage == 2 else None,
        repeat=True,
        seed=settings.seed,
        task_loss_weights=settings.task_loss_weights,
        phrase_loss_weight=settings.phrase_loss_weight,
    )


def train(model, settings):
    """The three stages; returns the per-step losses of each stage."""
    import keras

    from keras_qwenvl.training import recipe_optimizer
    from keras_qwenvl.training import set_stage

    curves = {}
    for stage, steps in zip((1, 2, 3), settings.stage_steps):
        if not steps:
            continue
        set_stage(model, stage)
        optimizer = recipe_optimizer(
            model,
            stage,
            total_steps=steps,
            peak_learning_rate=settings.peak_learning_rate[stage - 1],
            min_learning_rate=settings.peak_learning_rate[stage - 1] / 20,
            learning_rate_multipliers=learning_rate_multipliers(model, settings),
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=["sparse_categorical_accuracy"],
        )
        loader = stage_loader(model, settings, stage, steps)
        losses = step_losses()
        tasks = settings.stage_tasks[stage]
        print(f"\nStage {stage}: {steps} steps, tasks {tasks}")
        model.fit(
            loader.dataset(),
            epochs=1,
            steps_per_epoch=steps,
            callbacks=[losses],
        )
        curves[stage] = losses.values
    return curves


def iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (
        (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    )
    return inter / union if union > 0 else 0.0


def held_out_outputs(model, settings, task, prompt, max_new_tokens, seed):
    """Held-out examples of `task` and the model's greedy completions of
    `prompt(example)`, in batches of `settings.eval_batch`."""
    from keras_qwenvl.data.synthetic import synthetic_examples

    examples = synthetic_examples(
        task, settings.eval_images, seed=seed, **data_config(settings)
    )
    tokenizer = model.preprocessor.tokenizer
    outputs = []
    for start in range(0, len(examples), settings.eval_batch):
        chunk = examples[start : start + settings.eval_batch]
        prompts = [prompt(e) for e in chunk]
        longest = max(len(tokenizer.tokenize(p)) for p in prompts)
        outputs += model.generate(
            {"prompts": prompts, "images": [[e["images"][0]] for e in chunk]},
            max_length=longest + max_new_tokens,
            strip_prompt=True,
        )
    return examples, outputs


def evaluate(model, settings):
    """Scores on held-out synthetic images (seeds never trained on)."""
    from keras_qwenvl import parse_grounding
    from keras_qwenvl.data import tasks

    model.compile(sampler="greedy")
    size = (settings.image_size, settings.image_size)
    seed = 10_000 + settings.seed
    results = {}

    examples, outputs = held_out_outputs(
        model, settings, "grounding",
        lambda e: tasks.grounding_prompt(e["meta"]["phrase"]), 32, seed,
    )
    hits, drawn = 0, []
    for example, output in zip(examples, outputs):
        # The prompt ends at `</ref>`: the answer is the first box.
        parsed = parse_grounding(output, size)
        box = next((p["box"] for p in parsed if "box" in p), None)
        hits += box is not None and iou(box, example["meta"]["box"]) >= 0.5
        drawn.append((example, box))
    results["grounding_accuracy"] = hits / len(examples)

    examples, outputs = held_out_outputs(
        model, settings, "ocr", lambda e: tasks.ocr_prompt(), 180, seed + 1
    )
    correct = total = 0
    for example, output in zip(examples, outputs):
        read = [p["phrase"] for p in parse_grounding(output, size)]
        truth = example["meta"]["words"]
        correct += sum(
            i < len(read) and read[i] == word for i, word in enumerate(truth)
        )
        total += len(truth)
    results["ocr_word_accuracy"] = correct / total

    examples, outputs = held_out_outputs(
        model, settings, "caption", lambda e: tasks.caption_prompt(), 64, seed + 2
    )
    results["caption_exact_match"] = sum(
        output.strip() == e["meta"]["caption"]
        for e, output in zip(examples, outputs)
    ) / len(examples)
    return results, drawn


def draw_boxes(drawn, path, count=16, scale=3):
    """Held-out images with the true (green) and predicted (red) boxes."""
    tiles = []
    for example, box in drawn[:count]:
        image = Image.fromarray(np.asarray(example["images"][0], "uint8"))
        image = image.resize((image.width * scale, image.height * scale))
        draw = ImageDraw.Draw(image)
        truth = [v * scale for v in example["meta"]["box"]]
        draw.rectangle(truth, outline=(0, 200, 0), width=2)
        if box is not None:
            x1, y1, x2, y2 = (v * scale for v in box)
            corners = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
            draw.rectangle(corners, outline=(230, 0, 0), width=2)
        draw.text((3, 3), example["meta"]["phrase"], fill=(255, 255, 255))
        tiles.append(np.asarray(image))
    columns = 4
    rows = [
        np.concatenate(tiles[i : i + columns], axis=1)
        for i in range(0, len(tiles) - len(tiles) % columns or len(tiles), columns)
        if len(tiles[i : i + columns]) == columns
    ]
    if rows:
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def draw_losses(curves, path, width=640, height=320):
    """The loss per step, stages one after the other, with PIL."""
    values = [v for stage in sorted(curves) for v in curves[stage]]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if len(values) > 1:
        top, bottom = max(values), min(values)
        span = max(top - bottom, 1e-6)

        def point(i, v):
            return (
                10 + i * (width - 20) / (len(values) - 1),
                10 + (top - v) * (height - 30) / span,
            )

        draw.line([point(i, v) for i, v in enumerate(values)], fill="navy")
        offset = 0
        for stage in sorted(curves):
            x = point(offset, top)[0]
            draw.line([(x, 0), (x, height)], fill="grey")
            draw.text((x + 3, height - 15), f"stage {stage}", fill="black")
            offset += len(curves[stage])
        draw.text((width - 170, 5), f"loss {top:.2f} -> {values[-1]:.2f}", fill="black")
    image.save(path)


def probe_batch(model, settings):
    """A fixed batch of the stage-2 mixture (a seed never trained on)."""
    from keras_qwenvl.data.loader import QwenVLDataLoader
    from keras_qwenvl.data.synthetic import SyntheticSource

    source = SyntheticSource(
        settings.batch_size,
        seed=20_000 + settings.seed,
        tasks=settings.stage_tasks[2],
        **data_config(settings),
    )
    loader = QwenVLDataLoader(
        source, model.preprocessor, batch_size=settings.batch_size, shuffle=False
    )
    return next(iter(loader.dataset()))


def probe_loss(model, batch):
    """Mean cross-entropy per loss-carrying token of the probe batch."""
    from keras import ops

    x, y, weight = batch
    logits = model(x)
    losses = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
    weight = ops.cast(weight, losses.dtype)
    return float(ops.sum(losses * weight) / ops.sum(weight))


def run(settings, out):
    """Trains, saves and evaluates; returns (metrics, model, probe)."""
    import keras

    os.makedirs(out, exist_ok=True)
    start = time.time()
    model = build_model(settings, tempfile.mkdtemp())
    print(
        f"Qwen-VL with {model.backbone.count_params():,} parameters on "
        f"{keras.config.backend()}"
    )
    probe = probe_batch(model, settings)
    loss_before = probe_loss(model, probe)
    pretraining = pretrain_vision(model, settings)
    curves = train(model, settings)
    train_time = time.time() - start
    loss_after = probe_loss(model, probe)
    model.save_to_preset(os.path.join(out, "preset"))
    scores, drawn = evaluate(model, settings)
    draw_boxes(drawn, os.path.join(out, "boxes.png"))
    draw_losses(curves, os.path.join(out, "loss.png"))
    metrics = dict(
        scores,
        wall_time_s=round(time.time() - start, 1),
        train_time_s=round(train_time, 1),
        backend=keras.config.backend(),
        probe_loss_before=loss_before,
        probe_loss_after=loss_after,
        stage_losses={s: [c[0], c[-1]] for s, c in curves.items()},
        vision_pretraining_loss=pretraining[:1] + pretraining[-1:],
        settings=dataclasses.asdict(settings),
    )
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics, model, probe


def main(argv=None):
    # Runs on the backend Keras was imported with: examples/train_synthetic.py
    # picks JAX (where the demo was timed) unless KERAS_BACKEND says otherwise.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--out", default="train_synthetic_out", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = Settings(seed=args.seed, **(QUICK if args.quick else {}))
    metrics, _, _ = run(settings, args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
