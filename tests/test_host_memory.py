"""Handing the host memory a compilation freed back to the system."""

import ctypes
import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

from keras_qwenvl import host_memory
from keras_qwenvl.causal_lm import QwenVLCausalLM
from tests.test_model import tiny_backbone

on_jax = keras.config.backend() == "jax"
glibc = sys.platform.startswith("linux") and host_memory._malloc_trim()
jax_installed = importlib.util.find_spec("jax") is not None


@pytest.fixture(autouse=True)
def saved_state():
    """Each test leaves the process's setting as it found it."""
    state = dict(host_memory._state)
    yield
    host_memory._state.update(
        enabled=state["enabled"], declined=state["declined"]
    )


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fresh_compilation():
    """One XLA compilation of a function JAX has not seen."""
    import jax

    offset = np.random.default_rng().standard_normal()
    jax.jit(lambda x: x * 2.0 + offset)(np.ones(3, "float32"))


def free_between_pinned_blocks(count=1500, size=64 * 1024):
    """Frees `count` touched blocks of `size` bytes, each followed by a
    block still in use, so glibc's own trim (at the heap's top) cannot
    hand them back. Returns the pins, for `release`."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    freed, pins = [], []
    for _ in range(count):
        freed.append(libc.malloc(size))
        pins.append(libc.malloc(size))
        ctypes.memset(freed[-1], 1, size)
        ctypes.memset(pins[-1], 1, size)
    for block in freed:
        libc.free(block)
    return pins, libc.free, count * size


needs_glibc_jax = pytest.mark.skipif(
    not (on_jax and glibc),
    reason="the trim follows JAX compilations, with glibc's malloc_trim",
)


@needs_glibc_jax
@pytest.mark.parametrize("enabled", [True, False])
def test_a_compilation_hands_freed_memory_back(monkeypatch, enabled):
    monkeypatch.setattr(host_memory, "MIN_COMPILE_SECONDS", 0.0)
    assert host_memory.trim_after_compilations(enabled) is enabled
    fresh_compilation()  # JAX's first compilation sets up its CPU client
    pins, free, freed_bytes = free_between_pinned_blocks()
    try:
        before = resident_bytes()
        fresh_compilation()
        returned = before - resident_bytes()
    finally:
        for pin in pins:
            free(pin)
    if enabled:
        assert returned > 0.8 * freed_bytes, (returned, freed_bytes)
    else:
        assert returned < 0.1 * freed_bytes, (returned, freed_bytes)


@needs_glibc_jax
def test_short_compilations_are_not_followed_by_a_trim(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "MIN_COMPILE_SECONDS", 3600.0)
    assert host_memory.trim_after_compilations()
    monkeypatch.setitem(host_memory._state, "trim", calls.append)
    fresh_compilation()
    assert calls == []
    monkeypatch.setattr(host_memory, "MIN_COMPILE_SECONDS", 0.0)
    fresh_compilation()
    assert calls == [0]


def tiny_causal_lm():
    return QwenVLCausalLM(tiny_backbone(vision=False))


def test_compile_turns_trimming_on_with_jax_only():
    host_memory._state.update(enabled=False, declined=False)
    tiny_causal_lm().compile()
    assert host_memory.trimming() is bool(on_jax and glibc)


def test_compile_keeps_trimming_off_once_turned_off():
    host_memory.trim_after_compilations(False)
    tiny_causal_lm().compile()
    assert not host_memory.trimming()
    host_memory.trim_after_compilations()
    # Asked for, it follows JAX compilations whatever Keras' backend.
    assert host_memory.trimming() is bool(glibc and jax_installed)
