# peftlab — one environment for quickstart, tests and benchmarks.
# Facts of the build machine handled here:
#  * `pip install torch==2.13.0` resolves to a local CPU wheel; a bare `torch` would pull a multi-GB
#    CUDA build, so torch is installed first and pinned by a constraints file for everything after.
#  * deepspeed is a source package: built with --no-build-isolation after torch (else its isolated
#    build environment pulls a CUDA torch).
#  * triton 3.6's CPU interpreter needs numpy < 2.4.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.peftlab-installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv quickstart test test-fast bench bench-gpu lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	echo "numpy<2.4" >> $(VENV)/constraints.txt
	echo "triton==3.6.0" >> $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt "numpy<2.4" py-cpuinfo ninja packaging psutil hjson msgpack pydantic
	$(PIP) install -q -c $(VENV)/constraints.txt --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

quickstart: venv
	$(VENV)/bin/peftlab quickstart

# `python -P`: never put the repository root on sys.path, so our top-level kernels/ folder can not
# shadow the third-party `kernels` module that bitsandbytes imports (ours is peftlab.kernels).
test: venv
	OMP_NUM_THREADS=1 $(PY) -P -m pytest -q -n 2 --dist loadgroup tests

test-fast: venv
	OMP_NUM_THREADS=1 $(PY) -P -m pytest -q -x -n 2 --dist loadgroup tests -m "not slow"

bench: venv
	$(PY) -P bench/run_all.py --suite cpu

bench-gpu: venv
	$(PY) -P bench/run_all.py --suite gpu

lint: venv
	$(VENV)/bin/ruff check peftlab kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
