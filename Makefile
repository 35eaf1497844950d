# The two commands of the README. Each creates .venv and installs what it needs.
VENV := .venv
PY := $(VENV)/bin/python
# the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build)
TORCH := torch==2.13.0
# the distributed part of make bench (bench/fsdp_clip.py)
FSDP_ARGS ?= --out bench/results
# the DDP part (bench/ddp_clip.py)
DDP_ARGS ?= --out bench/results

.PHONY: test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:logging -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) bench/bench.py $(ARGS)
	$(PY) bench/fsdp_clip.py $(FSDP_ARGS)
	$(PY) bench/ddp_clip.py $(DDP_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
