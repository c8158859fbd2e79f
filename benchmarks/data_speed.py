"""How fast the built-in synthetic data is drawn and batched.

    python benchmarks/data_speed.py            # the main job's data
    python benchmarks/data_speed.py --count 2000

Prints one JSON object: examples per second of each synthetic task on its
own (drawing only, one process), and packed stage-2 batches per second
through `QwenVLDataLoader` with the main job's preprocessor, and the
number of examples in one. The main job's stage-2 step takes seconds on a
2-core CPU (one batch per step), so a loader that delivers several batches
per second keeps it busy.
"""

import argparse
import json
import tempfile
import time


def examples_per_second(task, count, data):
    from keras_qwenvl.data.synthetic import synthetic_examples

    start = time.perf_counter()
    synthetic_examples(task, count, seed=0, **data)
    return count / (time.perf_counter() - start)


def loader_batches_per_second(settings, batches):
    """Stage-2 batches per second, from the main job's own loader."""
    from keras_qwenvl.demo import synthetic as train_synthetic

    model = train_synthetic.build_model(settings, tempfile.mkdtemp())
    loader = train_synthetic.stage_loader(model, settings, 2, batches + 1)
    iterator = iter(loader.dataset())
    next(iterator)  # starts the pipeline
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500,
                        help="examples drawn per task")
    parser.add_argument("--batches", type=int, default=20,
                        help="stage-2 loader batches timed")
    args = parser.parse_args(argv)

    from keras_qwenvl.data.synthetic import TASKS
    from keras_qwenvl.demo import synthetic as train_synthetic

    settings = train_synthetic.Settings()
    data = train_synthetic.data_config(settings)
    report = {
        "examples_per_s": {
            task: round(examples_per_second(task, args.count, data), 1)
            for task in TASKS
        },
        "stage2_batches_per_s": round(
            loader_batches_per_second(settings, args.batches), 2
        ),
        "stage2_batch_size": settings.batch_size,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
