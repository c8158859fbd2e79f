"""How fast does a from-scratch vision encoder learn the demo's shapes and places?

Trains the main job's vision encoder (built by the main job's own code,
`keras_qwenvl.demo.synthetic`, with its default settings: 112-pixel images,
14-pixel patches, width 128, 4 blocks, 36 adapter queries) directly on one
question about the single shape in a synthetic image, with a dense layer
on the mean of its output tokens, and prints the held-out accuracy after
every epoch. `--question` picks the question:

- `shape`: its kind (four kinds, chance 0.25);
- `column`: the patch column of its left edge (seven at the default sizes;
  use it with `--grid`, which puts the edge on a patch boundary), what
  grounding needs: the mean of the tokens carries it only where the
  encoder ties an object's content to its place;
- `word`: the single word of an OCR image (40 words, chance 0.025), drawn
  at `--font-size` (a fraction of the image height; the main job's one
  size by default) and up to `--max-angle` degrees, starting on the
  `--grid` if given.

`--through` picks where the dense layer reads:

- `vit`: the ViT blocks' patch features;
- `adapter`: the adapter's 36 outputs (cross-attention included);
- `encoder`: the encoder's output, what the language model receives.

The optimiser is the paper's AdamW (0.9, 0.98, eps 1e-6, weight decay
0.05, global clip 1.0) at a constant learning rate. One run is one line of
JSON. Example (JAX, this repository's 2-core CPU, 8,000 images, 3 epochs
of 500 steps, about 100 s each):

    python benchmarks/vision_probe.py --through encoder --lr 7e-5
    python benchmarks/vision_probe.py --through encoder --lr 1.5e-4 --grid 14
    python benchmarks/vision_probe.py --lr 1.5e-4 --grid 14 --question column
    python benchmarks/vision_probe.py --lr 5e-4 --grid 14 --question word
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--through", choices=("vit", "adapter", "encoder"), default="encoder"
    )
    parser.add_argument(
        "--question", choices=("shape", "column", "word"), default="shape"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--object-size", type=float, nargs=2, default=(0.22, 0.4)
    )
    parser.add_argument(
        "--font-size", type=float, nargs=2, default=(0.16, 0.16)
    )
    parser.add_argument("--max-angle", type=float, default=10.0)
    parser.add_argument(
        "--grid",
        type=int,
        default=None,
        help="draw shapes on this pixel grid (the main job uses its 14-pixel "
        "patches); free placement by default",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from keras_qwenvl.data.synthetic import DEFAULT_SHAPES
    from keras_qwenvl.data.synthetic import WORDS
    from keras_qwenvl.data.synthetic import synthetic_examples

    # The main job's model, built by the main job's own code.
    from keras_qwenvl.demo import synthetic as train_synthetic

    settings = train_synthetic.Settings(seed=args.seed)
    size = settings.image_size
    model = train_synthetic.build_model(settings, tempfile.mkdtemp())
    encoder = model.backbone.vision_encoder
    held_out = 512
    examples = synthetic_examples(
        "ocr" if args.question == "word" else "caption",
        args.examples + held_out,
        seed=5,
        image_size=size,
        num_objects=(1, 1),
        object_size=tuple(args.object_size),
        num_words=(1, 1),
        font_size=tuple(args.font_size),
        max_angle=args.max_angle,
        grid=args.grid,
    )
    pixels = np.asarray(
        model.preprocessor.image_converter(
            np.stack([e["images"][0] for e in examples])
        )
    )
    metas = [e["meta"] for e in examples]
    if args.question == "word":
        labels = np.array([WORDS.index(m["words"][0]) for m in metas])
        classes = len(WORDS)
    elif args.question == "shape":
        labels = np.array(
            [DEFAULT_SHAPES.index(m["objects"][0]["shape"]) for m in metas]
        )
        classes = len(DEFAULT_SHAPES)
    else:
        patch = settings.patch_size
        labels = np.array([int(m["objects"][0]["box"][0]) // patch for m in metas])
        classes = size // patch

    class Features(keras.layers.Layer):
        """The encoder up to the point `--through` names."""

        def __init__(self, encoder, **kwargs):
            super().__init__(**kwargs)
            self.encoder = encoder

        def call(self, images):
            if args.through == "encoder":
                return self.encoder(images)
            x = self.encoder.patch_features(images)
            return x if args.through == "vit" else self.encoder.adapter(x)

    inputs = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling1D()(Features(encoder)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(classes)(pooled))
    model.compile(
        keras.optimizers.AdamW(
            args.lr,
            weight_decay=0.05,
            beta_1=0.9,
            beta_2=0.98,
            epsilon=1e-6,
            global_clipnorm=1.0,
        ),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    n = args.examples
    start = time.time()
    history = model.fit(
        pixels[:n],
        labels[:n],
        batch_size=args.batch,
        epochs=args.epochs,
        validation_data=(pixels[n:], labels[n:]),
        verbose=0,
    )
    result = dict(
        vars(args),
        backend=keras.config.backend(),
        steps_per_epoch=-(-n // args.batch),
        held_out_accuracy=[round(v, 3) for v in history.history["val_accuracy"]],
        train_accuracy=[round(v, 3) for v in history.history["accuracy"]],
        seconds=round(time.time() - start, 1),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
