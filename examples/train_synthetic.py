"""The main job: train a small Qwen-VL from scratch on built-in synthetic
data through the paper's three stages, then score it on held-out images.

    python examples/train_synthetic.py              # the full demo
    python examples/train_synthetic.py --quick      # a CI-sized smoke run
    python examples/train_synthetic.py --out DIR    # where results go

The code is `keras_qwenvl.demo.synthetic` (see its docstring for what each
stage trains and how the scores are computed).
"""

import os

# JAX unless KERAS_BACKEND says otherwise (the demo was timed on JAX, the fastest backend on this CPU); set
# before Keras is imported.
os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_qwenvl.demo.synthetic import main  # noqa: E402

if __name__ == "__main__":
    main()
