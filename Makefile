# Development tasks. `make test` installs the package with all three
# backends and runs the suite once per backend (what CI runs).
PYTHON ?= python
BACKENDS ?= jax torch tensorflow
PYTEST_ARGS ?=
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
		KERAS_BACKEND=$$backend TF_CPP_MIN_LOG_LEVEL=3 \
			$(PYTHON) -m pytest -q $(PYTEST_ARGS) || status=1; \
	done; \
	exit $$status
