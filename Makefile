# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first with a pinned build so that nothing pulls a newer one;
# on another machine override it, e.g. make test TORCH="torch torchvision".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= text,vision,lightning,export,tensorboard,lora,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.frostline-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/frostline fit

test: $(STAMP)
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m pytest -q

# by hand, on an idle machine: frostline against a plain loop, the HF Trainer and Lightning (over an hour)
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),bench]'
	$(BIN)/python benchmarks/compare.py --out compare.md

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
