# `make train` and `make test` do all set-up on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test test-all bench-overhead bench-grokfast bench-trm-sudoku bench-rgm bench-lpl bench-cogment bench-startup bench-checkpoint bench-peers clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-installs only when the requirement files change.
$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.installed
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $@

train: $(VENV)/.installed
	$(BIN)/python train.py $(ARGS)

# The fast default suite (< 15 min on 2 cores). `make test-all` adds the long runs.
test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest $(ARGS)

test-all: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m "" $(ARGS)

bench-overhead: $(VENV)/.installed
	$(BIN)/python -m bench.overhead $(ARGS)

bench-grokfast: $(VENV)/.installed
	$(BIN)/python -m bench.grokfast $(ARGS)

bench-trm-sudoku: $(VENV)/.installed
	$(BIN)/python -m bench.trm_sudoku $(ARGS)

bench-rgm: $(VENV)/.installed
	$(BIN)/python -m bench.rgm $(ARGS)

bench-lpl: $(VENV)/.installed
	$(BIN)/python -m bench.lpl $(ARGS)

bench-startup: $(VENV)/.installed
	$(BIN)/python -m bench.startup $(ARGS)

bench-cogment: $(VENV)/.installed
	$(BIN)/python -m bench.cogment $(ARGS)

bench-checkpoint: $(VENV)/.installed
	$(BIN)/python -m bench.checkpoint_stall $(ARGS)

# Lightning is installed for this benchmark only (requirements-bench.txt), never for users.
$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(BIN)/python -m pip install -r requirements-bench.txt
	touch $@

bench-peers: $(VENV)/.bench-installed
	$(BIN)/python -m bench.peers $(ARGS)

clean-venv:
	rm -rf $(VENV)
