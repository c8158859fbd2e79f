"""Train Qwen-VL on a device mesh with `keras.distribution` (JAX).

    # 8 accelerators as 4-way data x 2-way model parallel, the 9.6B model:
    python examples/train_distributed.py --config 7b --mesh 4,2 --stage 3 \\
        --precision mixed_bfloat16 --batch-size 8 --accumulation 16

    # The same on 8 simulated CPU devices with a tiny model (a smoke run):
    python examples/train_distributed.py --config tiny --mesh 4,2 \\
        --simulate-cpu-devices 8

The code is `keras_qwenvl.demo.distributed` (see its docstring for the
flags, the mesh layout and loading the published checkpoint).
"""

import os

# JAX unless KERAS_BACKEND says otherwise (keras.distribution is implemented for JAX only); set
# before Keras is imported.
os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_qwenvl.demo.distributed import main  # noqa: E402

if __name__ == "__main__":
    main()
