"""Position tables of the vision side: the adapter's fixed 2D sin-cos table
and the bicubic resize that maps a 16x16 table to the actual patch grid.

The reference resizes with PyTorch's `F.interpolate(mode="bicubic",
align_corners=False)`: cubic convolution with A = -0.75, no antialiasing,
border indices clamped. `jax.image.resize` and `tf.image.resize` use other
kernels, so the resize is written here as a fixed (target, source) matrix per
axis, built in plain Python (a constant to every compiler) and applied
with `keras.ops`.
"""

import math

import numpy as np
from keras import ops


def sincos_2d_table(dim, grid_size):
    """(grid*grid, dim) MAE-style 2D sin-cos table, float32.

    The first half of the channels encodes the column index, the second half
    the row index; each half is [sin | cos] over dim // 4 frequencies
    1 / 10000 ** (i / (dim / 4)).
    """
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float32),
        np.arange(grid_size, dtype=np.float32),
        indexing="ij",
    )

    def one_axis(half_dim, pos):
        omega = np.arange(half_dim // 2, dtype=np.float32) / (half_dim / 2.0)
        omega = 1.0 / 10000**omega
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate(
        [one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1
    ).astype(np.float32)


def _cubic_weights(t, a=-0.75):
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fraction t."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return (far(t + 1), near(t), near(1 - t), far(2 - t))


def _bicubic_rows(source, target):
    """`bicubic_resize_matrix` as lists of Python floats (float64).

    Plain Python, so that `torch.compile` can trace a model that resizes
    its table (Dynamo does not trace a numpy array's dtype) and sees a
    constant."""
    rows = []
    scale = source / target
    for i in range(target):
        row = [0.0] * source
        center = (i + 0.5) * scale - 0.5
        base = math.floor(center)
        weights = _cubic_weights(center - base)
        for tap, w in zip(range(base - 1, base + 3), weights):
            row[min(max(tap, 0), source - 1)] += w
        rows.append(row)
    return rows


def bicubic_resize_matrix(source, target):
    """(target, source) float32 matrix of PyTorch's bicubic interpolation
    (align_corners=False, A = -0.75, no antialiasing)."""
    return np.array(_bicubic_rows(source, target)).astype(np.float32)


def resize_position_table(table, target_grid):
    """Resize a (g*g, c) table, seen as a g x g grid, to (t*t, c).

    Computed in float32 like the reference; the identity when sizes match.
    """
    source_grid = int(round(table.shape[0] ** 0.5))
    if source_grid == target_grid:
        return table
    matrix = ops.convert_to_tensor(
        _bicubic_rows(source_grid, target_grid), dtype="float32"
    )
    dtype = table.dtype
    grid = ops.reshape(
        ops.cast(table, "float32"), (source_grid, source_grid, -1)
    )
    grid = ops.einsum("ti,ijc->tjc", matrix, grid)
    grid = ops.einsum("sj,tjc->tsc", matrix, grid)
    return ops.cast(ops.reshape(grid, (target_grid * target_grid, -1)), dtype)
