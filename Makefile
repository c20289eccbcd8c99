# hada-book: `make book` builds the executed book, `make test` runs the whole test suite.
# Both create .venv from environment.yml's exact pins when it is missing or out of date.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hada-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help install data book lab test test-presets bench gpu-kit clean-book

help:
	@echo "make book   build the executed book in _build/html (hada prepare first: data, backbones, runs)"
	@echo "make lab    open JupyterLab on book/: each chapter opens as a notebook, to run cell by cell"
	@echo "make test   run the whole test suite (installs first if needed)"
	@echo "make test-presets  rerun every page with each preset of book/params/ through papermill (about 7 min)"
	@echo "make data   prepare the embedded default only: synthetic data, backbones, features under data/"
	@echo "make bench  print the benchmark tables"
	@echo "make gpu-kit  wheels for a CUDA machine with torch and torch-geometric, in .gpu-kit (README)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Byte-compiled once, on every core: pip compiles on one (over a minute), and Python does not cache what
# it compiles on import where PYTHONDONTWRITEBYTECODE is set (as on our CI machines): every notebook kernel
# and worker then spent ~13 s more importing torch and open_clip. A file that does not compile (some
# packages ship Python 2 fixtures) is just imported from source, so compileall's status is ignored (with `|| true`,
# not make's `-`, which would print "Error 1 (ignored)" into every build log).
# uv (pinned in environment.yml) installs the pins, downloading and unpacking in parallel: about 20 s here, where pip
# took 75-85 s. Where uv cannot (an index that only pip's own configuration names, say), pip installs them.
# --no-cache: uv's cache would hold another copy of the 4 GB of CUDA wheels.
$(STAMP): $(BIN)/python pyproject.toml environment.yml
	sed -n 's/^ *- *\([A-Za-z0-9_.-]*==[^ ]*\) *$$/\1/p' environment.yml > $(VENV)/pins.txt
	grep -v '^clip-benchmark==' $(VENV)/pins.txt > $(VENV)/pins-deps.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q $$(grep '^uv==' $(VENV)/pins.txt)
	$(BIN)/uv pip install -q --no-cache --python $(BIN)/python -r $(VENV)/pins-deps.txt || \
	  $(BIN)/python -m pip install --disable-pip-version-check -q --no-compile -r $(VENV)/pins-deps.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-compile --no-deps $$(grep '^clip-benchmark==' $(VENV)/pins.txt)
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m compileall -qq -j 0 hada "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $@

install: $(STAMP)

# `hada prepare` makes what the chapters read (data, backbones, features, training runs) as a dependency graph
# on one process per core (fewer where the free memory holds fewer, at 10 GB each); the chapters would make the same themselves, one step at a time.
data: install
	$(BIN)/hada prepare --no-runs

# jupyter-book reruns a chapter only when its code cells change; `hada prepare` also clears its notebook cache
# (_build/.jupyter_cache) when the code of hada/ changed since the chapters ran (comments and docstrings aside),
# so the build re-executes them on the new numbers.
# The build is `jupyter-book build -W --keep-going book/` with the chapters executed on as many processes as
# `hada prepare` uses (book/_ext/hada_parallel.py: Sphinx's parallel reading, which jupyter-book's command does not
# offer). -W: a warning fails the build (a broken reference, a missing figure, an unknown cell output), and
# --keep-going lists all of them before it fails instead of stopping at the first.
book: install
	$(BIN)/hada prepare
	$(BIN)/python book/_ext/hada_parallel.py build -W --keep-going book/

# JupyterLab on book/ (the repository as its root): a chapter's MyST source opens as a notebook through jupytext's
# contents manager (jupytext enables it as a server extension in .venv/etc/jupyter) and runs cell by cell on
# .venv's kernel, from book/ as the build runs it. .jupyter/labconfig, put on the config path here as Binder puts
# it (the repository is Binder's home), makes "Jupytext Notebook" the viewer a double click opens .md files in.
# Saving writes the chapter back as MyST, without outputs. The kernels talk to the server over CurveZMQ-encrypted
# sockets where their kernelspec offers it (ipykernel's does), as in the book's build (book/_ext/hada_kernels.py).
# Extra options: make lab LAB_ARGS="--port 8899".
lab: install
	JUPYTER_CONFIG_PATH="$(CURDIR)/.jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  $(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --ServerApp.default_url=/lab/tree/book \
	  --KernelManager.transport_encryption=auto $(LAB_ARGS)

# Two passes: the tests that need no built book on two processes (they are small and mostly single-threaded),
# then the book's build and the tests that read it, alone (its `hada prepare` already uses every core).
test: install
	$(BIN)/python -m pytest -m "not book and not presets" -n 2 --dist loadfile
	$(BIN)/python -m pytest -m book

# Every page rerun through papermill with each preset of book/params/, pointed at a miniature of its dataset
# (tests/test_presets.py: about 7 minutes on 2 cores; every pull request runs it).
test-presets: install
	$(BIN)/python -m pytest -m presets

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

# The wheels (open_clip and its needs, for CPython 3.12 and 3.11 on manylinux x86-64) that a CUDA machine with torch,
# torchvision and torch-geometric lacks; benchmarks/gpu_check.sh installs them there without a network (README).
gpu-kit:
	$(PYTHON) benchmarks/gpu_kit.py download --dest .gpu-kit

clean-book:
	rm -rf _build
