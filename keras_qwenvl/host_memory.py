"""Handing the host memory that a JAX compilation freed back to the
operating system.

XLA's compiler allocates and frees hundreds of megabytes of host memory
while it compiles a training step. glibc's malloc keeps most of it: the
freed blocks lie between blocks still in use, where its automatic trim
(at the top of the heap only) does not reach. The compiled step then runs
on buffers mapped afresh, so the process's peak resident memory holds
both. At the benchmark's "small" sizes (JAX on a 2-core CPU) the compiler
left 0.45 GB behind, and a rematerialised training step's peak fell from
4.43 to 3.98 GB once it was handed back (README, "Benchmarks").

`malloc_trim(0)` returns every free page of glibc's heaps; it took 70 ms
after that compilation. `trim_after_compilations()` runs it after each
JAX compilation that took `MIN_COMPILE_SECONDS` or more;
`QwenVLCausalLM.compile()` turns it on for the process on JAX, unless
`trim_after_compilations(False)` turned it off before.
"""

import ctypes

# JAX reports each XLA compilation's duration under this event.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# An eager op compiles in milliseconds and leaves little behind; a trim
# after each would cost more than it returns.
MIN_COMPILE_SECONDS = 1.0

# "trim": glibc's function once the listener is registered, else None.
_state = {"enabled": False, "declined": False, "trim": None}


def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (macOS,
    Windows, musl)."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def _after_event(event, duration_secs, **kwargs):
    if (
        _state["enabled"]
        and event == _COMPILE_EVENT
        and duration_secs >= MIN_COMPILE_SECONDS
    ):
        _state["trim"](0)


def trim_after_compilations(enabled=True):
    """Whether each JAX compilation of `MIN_COMPILE_SECONDS` or more is
    followed by glibc's `malloc_trim(0)` (see the module's docstring).

    It lowers the peak memory of a process that compiles a large program
    and then runs it, and changes nothing else. The setting holds for the
    whole process; `trim_after_compilations(False)` turns it off again.

    Returns:
        Whether trimming is on: False where JAX or glibc is absent.
    """
    if not enabled:
        _state["enabled"] = False
        _state["declined"] = True
        return False
    _state["declined"] = False
    if _state["trim"] is None:
        trim = _malloc_trim()
        if trim is None:
            return False
        try:
            import jax.monitoring
        except ImportError:
            return False
        _state["trim"] = trim
        jax.monitoring.register_event_duration_secs_listener(_after_event)
    _state["enabled"] = True
    return True


def trim_by_default():
    """`trim_after_compilations()` unless it was turned off; on JAX only
    (`QwenVLCausalLM.compile()` calls it)."""
    import keras

    if keras.config.backend() == "jax" and not _state["declined"]:
        trim_after_compilations()


def trimming():
    """Whether `trim_after_compilations` is on in this process."""
    return _state["enabled"]
