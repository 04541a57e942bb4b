# The README's commands. Everything installs into .venv; torch is pinned to the CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Real CIFAR-10 beside the repo when it is there; otherwise the loaders download into ~/.cache/fedssl.
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar-10-batches-py/data_batch_1),../shared/data,)
DATA_SET  = $(if $(DATA_DIR),--set data_dir=$(DATA_DIR),)

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/fedssl run --config configs/cifar10/fedmoco.toml $(DATA_SET)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/federation_overhead.py $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

clean:
	rm -rf $(VENV) runs .pytest_cache
