"""Rematerialising a layer's call in training."""

import keras

from keras_qwenvl.ordering import after


def rematerialized_call(layer, forward, x):
    """`forward(x)` (a call of `layer`, a function of the tensor `x`
    alone) whose activations the backward pass recomputes instead of
    keeping them.

    `keras.remat` does that on every backend. On JAX its recomputation
    depends on nothing the backward pass makes, and XLA's CPU scheduler
    runs it during the forward pass, so that the recomputed activations
    are held as long as without rematerialisation. Here, on JAX, the
    recomputation starts from `x` plus zero times one entry of the
    output's gradient: it cannot run before that gradient exists.
    """
    if keras.config.backend() != "jax":
        return keras.remat(forward)(x)
    variables = layer.variables
    if not all("float" in str(v.dtype) for v in variables):
        raise ValueError(
            f"`{layer.name}` cannot be rematerialised on JAX: it holds "
            "non-float state (the random state of a dropout > 0), which a "
            "recomputed call cannot update. Set `dropout=0` or `remat=False`."
        )
    return _jax_tied_remat(forward, variables, x)


def _jax_tied_remat(forward, variables, x):
    import jax

    def pure(x, values):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            return forward(x)

    @jax.custom_vjp
    def run(x, values):
        return pure(x, values)

    def run_forward(x, values):
        return pure(x, values), (x, values)

    def run_backward(saved, upstream):
        x, values = saved
        x = after(x, upstream)
        _, vjp = jax.vjp(pure, x, values)
        return vjp(upstream)

    run.defvjp(run_forward, run_backward)
    return run(x, [v.value for v in variables])
