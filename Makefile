# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_OUT ?= build/demo

.PHONY: install install-test demo test bench clean

# torch first (kept if already there; here 2.13.0 is the CPU build): a bare `torch`
# requirement would pull a multi-GB CUDA build
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .

install-test: install
	$(PIP) install -q -e ".[test,plot,ray]"

demo: install
	$(PYTHON) -m pairpack.cli demo --out $(DEMO_OUT)

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench: install-test
	$(PYTHON) tools/bench_reader.py
	$(PYTHON) tools/bench_build.py

clean:
	rm -rf build .pytest_cache .hypothesis
