# Two commands on a fresh machine (Python 3.10+):  `make run`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of PyTorch. With an NVIDIA GPU, use e.g. TORCH_SPEC=torch (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Extra pip options for installing torch, e.g. PIP_TORCH_OPTS="--index-url <PyTorch's CPU wheel index>"
PIP_TORCH_OPTS ?=
ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

BIN := $(VENV)/bin

.PHONY: run test setup test-deps clean-venv

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_TORCH_OPTS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/cifarlab run $(ARGS)

# The report test opens the HTML in a real headless Chromium (Debian's package).
test-deps:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium + chromium-driver for the browser test"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup test-deps
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
