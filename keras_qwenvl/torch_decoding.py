"""PyTorch: generation's decoding step under `torch.compile`, its guards
checked where something can have changed.

Before it runs a compiled graph, Dynamo checks guards: that the module
attributes, dtype policies, quantization and LoRA flags and tensor
layouts the trace read are as they were. For a Keras model that is
thousands of checks, 3 ms of a 27 ms batch-1 decoding step at the
benchmark's "small" size on a 2-core CPU (24 against 27 ms without them,
step alone, alternating). Within one generation nothing they cover can
change: every step calls the same graph with inputs of the same shapes.
So `CompiledStep` checks them in full on the first two steps of each
generation (the first step's cache comes from the prompt's pass, later
ones from the step itself) and on later steps only those that tell its
compiled graphs apart (Dynamo's `skip_guard_eval_unsafe` stance: the
input tensors' shapes and whatever failed a check before). A model
quantized, given LoRA or cast between two generations is caught by the
next generation's first step, which compiles it again.

That needs the step to be one graph (`fullgraph=True`: with graph
breaks, layers' own methods get compiled frames whose guards the stance
would skip too) with compiled entries of its own (`isolate_recompiles`:
another model's entries, or a limit reached on the way, cannot then be
picked by a partial check; past the recompilation limit a whole-graph
compile raises instead of falling back to eager code).

A step that breaks the graph runs eagerly instead: Keras' own int8
layers split it into 66 graphs, 82-84 ms a "small" step compiled against
52 eagerly (the decoder's int8 projections and lm_head now trace into one
graph: `narrow_products.int8_projection`; other quantization modes, and
LoRA on int8 layers, still take Keras' layers). One past the
recompilation limit (more batch sizes and lengths than the limit) goes on
under a plain `torch.compile`, every guard checked on every step; so
does the step on a PyTorch without these options.

Imported by `causal_lm` on the PyTorch backend only.
"""

import inspect

import torch

# Steps of one generation checked against every guard.
GUARDED_STEPS = 2

# Inductor's options for a model with int8 layers: a pointwise value is
# computed into a buffer of its own past 4 operations (Inductor's CPU
# default: 50), so that the lm_head's one-row product
# (`narrow_products.product`) reads the quantized row instead of
# quantizing it again for each of the vocabulary's rows: the "small"
# int8 decoding step took 94-138 against 63-78 tok/s (F, two processes
# each, alternated). Float steps keep the defaults.
INT8_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 4}


def _supported():
    options = inspect.signature(torch.compile).parameters
    stance = getattr(torch.compiler, "set_stance", None)
    return (
        "isolate_recompiles" in options
        and stance is not None
        and "skip_guard_eval_unsafe" in inspect.signature(stance).parameters
    )


_SUPPORTED = _supported()


class CompiledStep:
    """`fn` (the model's `call_with_cache`) compiled for generation.

    `generation()` returns the callable for one generation: `fn`'s
    compiled graph, every guard checked on its first `GUARDED_STEPS`
    calls, only the graphs' differences after them. `mode` says how
    steps run: "whole graph", "eager" (the step broke the graph) or
    "guarded" (a plain `torch.compile`).
    """

    def __init__(self, fn, int8=False):
        """`int8`: the model holds int8 layers (`INT8_INDUCTOR_OPTIONS`)."""
        self._fn = fn
        self._plain = None
        self._options = {"options": INT8_INDUCTOR_OPTIONS} if int8 else {}
        if _SUPPORTED:
            self._whole = torch.compile(
                fn, dynamic=False, fullgraph=True, isolate_recompiles=True,
                **self._options,
            )
            self.mode = "whole graph"
        else:
            self._whole = None
            self._guarded()

    def _guarded(self):
        options = {"isolate_recompiles": True} if _SUPPORTED else {}
        self._plain = torch.compile(
            self._fn, dynamic=False, **options, **self._options
        )
        self._whole = None
        self.mode = "guarded"

    def generation(self):
        calls = 0

        def step(*args, **kwargs):
            nonlocal calls
            calls += 1
            if self._whole is None:
                return (self._plain or self._fn)(*args, **kwargs)
            if calls > GUARDED_STEPS:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._whole(*args, **kwargs)
            try:
                return self._whole(*args, **kwargs)
            except torch._dynamo.exc.Unsupported:
                self._whole = None
                self.mode = "eager"
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                self._guarded()
            return step(*args, **kwargs)

        return step
