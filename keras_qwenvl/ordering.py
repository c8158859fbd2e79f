"""Steering XLA inside a compiled step: what runs when, by data alone
(`after`), and which operand is an array of its own (`materialized`)."""

import keras
from keras import ops


def after(tensor, dependency):
    """`tensor`, made to depend on `dependency`: plus zero times its first
    entry (the same value wherever that entry is finite; were it not, no
    gradient of the step would be). XLA's CPU scheduler and copy removal
    follow data dependencies, not optimization barriers, so this is how
    the model keeps a table-sized array, a weight copy or a recomputation
    from being made earlier than needed."""
    entry = ops.reshape(dependency, (-1,))[0]
    if "float" not in keras.backend.standardize_dtype(tensor.dtype):
        # An integer times zero folds to zero and the dependency with it:
        # plus 1 where the entry is NaN (which a float dependency's NaN
        # would make of the result anyway), 0 elsewhere.
        return tensor + ops.cast(ops.isnan(entry), tensor.dtype)
    return tensor + ops.cast(entry, tensor.dtype) * 0


def materialized(tensor):
    """`tensor` as an array of its own inside a compiled JAX step.

    XLA folds a transpose into the matmul that reads it. On the CPU a
    matmul that contracts its left operand's first axis then runs outside
    XLA's fused matmul kernels, which costs a buffer the size of its output
    outside the step's planned temporaries (311 MB for the lm_head kernel's
    gradient at Qwen's vocabulary and width 512). Behind an optimization
    barrier the transposed operand is computed once, and the matmul is a
    plain one. The identity on PyTorch and TensorFlow."""
    if keras.backend.backend() != "jax":
        return tensor
    import jax

    return jax.lax.optimization_barrier(tensor)
