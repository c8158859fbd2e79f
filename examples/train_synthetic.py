"""The main job: train a small Qwen-VL from scratch on built-in synthetic
data through the paper's three stages, then score it on held-out images.

    python examples/train_synthetic.py              # the full demo
    python examples/train_synthetic.py --quick      # a CI-sized smoke run
    python examples/train_synthetic.py --out DIR    # where results go

The code is `keras_qwenvl.demo.synthetic` (see its docstring for what each
stage trains and how the scores are computed).
"""

import os
import platform
import sys

# glibc's tunable that backs large malloc'ed blocks with transparent huge
# pages (glibc 2.35 and newer).
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_page_environment(environ, platform_name, libc):
    """The environment to restart this script with, or None to go on.

    XLA's CPU runtime allocates the scratch memory of each call of a
    compiled function afresh (about 1 GB per training step here) and frees
    it after; glibc's malloc maps a block that large anew each time, and
    the kernel then zeroes it 4 KiB at a time: about 250,000 page faults
    and 0.9 s of system time per 2.9 s stage-2 step on a 2-core machine.
    With `HUGE_PAGES` the step takes about 2.3 s and computes the same
    numbers (docs/main_job.md, "Page faults, and the time target on
    machine B"). glibc reads its tunables when a process starts, hence the
    restart. A `GLIBC_TUNABLES` the user
    set, even to nothing, stands: `GLIBC_TUNABLES= python
    examples/train_synthetic.py` opts out.

    Args:
        environ: the current environment (a mapping).
        platform_name: `sys.platform`.
        libc: `platform.libc_ver()`, a (name, version) pair.
    """
    name, version = libc
    if not platform_name.startswith("linux") or name != "glibc":
        return None
    if "GLIBC_TUNABLES" in environ or not version:
        return None
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return None
    return dict(environ, GLIBC_TUNABLES=HUGE_PAGES)


if __name__ == "__main__":
    environ = huge_page_environment(
        os.environ, sys.platform, platform.libc_ver()
    )
    if environ is not None:
        # The same command line, once more, before anything heavy loads.
        os.execve(sys.executable, sys.orig_argv, environ)
    # JAX unless KERAS_BACKEND says otherwise (the demo was timed on JAX,
    # the fastest backend on this CPU); set before Keras is imported.
    os.environ.setdefault("KERAS_BACKEND", "jax")

    from keras_qwenvl.demo.synthetic import main

    main()
