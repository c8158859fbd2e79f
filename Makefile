# Development tasks. `make test` installs the package with all three
# backends and runs the suite once per backend (what CI runs).
PYTHON ?= python
BACKENDS ?= jax torch tensorflow
PYTEST_ARGS ?=
# Test processes per backend (pytest-xdist; each test file stays in one
# process, so module fixtures run once). Much of a test's time is XLA
# compiling or Python tracing on one core: on a 2-core machine two
# processes took the suite from 43 to 31.5 minutes; 0 runs the suite in
# this process.
PYTEST_WORKERS ?= 2
# OpenMP threads per PyTorch test process. Two processes with a thread
# per core each oversubscribe a 2-core machine, and PyTorch's OpenMP
# threads that wait by spinning then slow each other down: one thread each
# took the PyTorch suite from 8.0 to 5.7 minutes (TensorFlow's and JAX's
# suites did not gain from it).
TORCH_OMP_THREADS ?= 1
# The CPU wheel of PyTorch; an unpinned `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test check

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[all,test]"

test: install check

check:
	@status=0; \
	for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend"; \
		threads=; \
		if [ $$backend = torch ]; then \
			threads=OMP_NUM_THREADS=$(TORCH_OMP_THREADS); \
		fi; \
		env $$threads KERAS_BACKEND=$$backend TF_CPP_MIN_LOG_LEVEL=3 \
			$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile \
			$(PYTEST_ARGS) || status=1; \
	done; \
	exit $$status
