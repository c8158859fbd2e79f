"""Ordering work inside a compiled step by data alone."""

from keras import ops


def after(tensor, dependency):
    """`tensor`, made to depend on `dependency`: plus zero times its first
    entry (the same value wherever that entry is finite; were it not, no
    gradient of the step would be). XLA's CPU scheduler and copy removal
    follow data dependencies, not optimization barriers, so this is how
    the model keeps a table-sized array, a weight copy or a recomputation
    from being made earlier than needed."""
    entry = ops.reshape(dependency, (-1,))[0]
    return tensor + ops.cast(entry, tensor.dtype) * 0
