"""Runnable demos that ship with the package.

- `keras_qwenvl.demo.synthetic`: the main job, a small Qwen-VL trained from
  scratch through the paper's three stages on built-in synthetic data and
  scored on held-out images (`examples/train_synthetic.py`).
- `keras_qwenvl.demo.distributed`: training on a device mesh with
  `keras.distribution` (`examples/train_distributed.py`).

They live in the package, not only in `examples/`, so that an installed
package (a Colab runtime, for instance) can run and import them:
`python -m keras_qwenvl.demo.synthetic --quick`.
"""
