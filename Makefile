# hada-book: `make book` builds the executed book, `make test` runs the whole test suite.
# Both create .venv from environment.yml's exact pins when it is missing or out of date.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hada-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help install data book test bench gpu-kit clean-book

help:
	@echo "make book   build the executed book in _build/html (hada prepare first: data, backbones, runs)"
	@echo "make test   run the whole test suite (installs first if needed)"
	@echo "make data   prepare the embedded default only: synthetic data, backbones, features under data/"
	@echo "make bench  print the benchmark tables"
	@echo "make gpu-kit  wheels for a CUDA machine with torch and torch-geometric, in .gpu-kit (README)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Byte-compiled once, on every core: pip compiles on one (over a minute), and Python does not cache what
# it compiles on import where PYTHONDONTWRITEBYTECODE is set (as on our CI machines): every notebook kernel
# and worker then spent ~13 s more importing torch and open_clip. A file that does not compile (some
# packages ship Python 2 fixtures) is just imported from source, so compileall's status is ignored.
$(STAMP): $(BIN)/python pyproject.toml environment.yml
	sed -n 's/^ *- *\([A-Za-z0-9_.-]*==[^ ]*\) *$$/\1/p' environment.yml > $(VENV)/pins.txt
	grep -v '^clip-benchmark==' $(VENV)/pins.txt > $(VENV)/pins-deps.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-compile -r $(VENV)/pins-deps.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-compile --no-deps $$(grep '^clip-benchmark==' $(VENV)/pins.txt)
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	-$(BIN)/python -m compileall -qq -j 0 hada "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	touch $@

install: $(STAMP)

# `hada prepare` makes what the chapters read (data, backbones, features, training runs) as a dependency graph
# on one process per core; the chapters would make the same themselves, one step at a time.
data: install
	$(BIN)/hada prepare --no-runs

# jupyter-book reruns a chapter only when its code cells change; `hada prepare` also clears its notebook cache
# (_build/.jupyter_cache) when the code of hada/ changed since the chapters ran (comments and docstrings aside),
# so the build re-executes them on the new numbers.
book: install
	$(BIN)/hada prepare
	$(BIN)/jupyter-book build book/

test: install
	$(BIN)/python -m pytest

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

# The wheels (open_clip and its needs, for CPython 3.12 and 3.11 on manylinux x86-64) that a CUDA machine with torch,
# torchvision and torch-geometric lacks; benchmarks/gpu_check.sh installs them there without a network (README).
gpu-kit:
	$(PYTHON) benchmarks/gpu_kit.py download --dest .gpu-kit

clean-book:
	rm -rf _build
