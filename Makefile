# The README's commands. Everything installs into .venv; torch is pinned to the CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Data for the demo, offline first: the real CIFAR-10 beside the repo; else Debian's Fashion-MNIST
# (apt-get install dataset-fashion-mnist); else CIFAR-10 downloaded into ~/.cache/fedssl/data.
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar-10-batches-py/data_batch_1),../shared/data,)
FASHION   = $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte*)
DATA_SET  = $(if $(DATA_DIR),--set data_dir=$(DATA_DIR),$(if $(FASHION),--set dataset=fashion-mnist,))

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/fedssl run --config configs/cifar10/demo.toml $(DATA_SET)

test: install
	$(BIN)/python -m pytest -q --durations=25

bench: install
	$(BIN)/python benchmarks/federation_overhead.py $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

clean:
	rm -rf $(VENV) runs .pytest_cache
