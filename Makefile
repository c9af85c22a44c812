# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_OUT ?= build/demo

.PHONY: install install-test install-fuzz install-docs demo test test-serial test-long docs sanitize fuzz bench clean

# torch first (kept if already there; here 2.13.0 is the CPU build): a bare `torch`
# requirement would pull a multi-GB CUDA build
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .

install-test: install
	$(PIP) install -q -e ".[test,plot,ray]"

# the documentation site's builder (mkdocs.yml)
install-docs: install
	$(PIP) install -q -e ".[docs]"

# atheris (libFuzzer for Python) for tools/fuzz_cov.py; a wheel, no compiler needed
install-fuzz: install-test
	$(PIP) install -q -e ".[fuzz]"

demo: install
	$(PYTHON) -m pairpack.cli demo --out $(DEMO_OUT)

# in parallel on every core (pytest-xdist); `make test-serial` runs one test at a time
test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider -n auto

test-serial: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider

# the Hypothesis tests with the `long` profile (tests/conftest.py: 400 examples where a test takes its
# count from the profile, 10x the default); longer fuzzing: `make fuzz`, tools/fuzz.py
test-long: install-test
	HYPOTHESIS_PROFILE=long $(PYTHON) -m pytest -q -p no:cacheprovider -n auto

# the documentation site into site/, failing on any warning (broken link or anchor, unparsable docstring)
docs: install-docs
	$(PYTHON) -m mkdocs build --strict

# the C kernels under ASan + UBSan (gcc), with the hostile-input tests and the fuzz corpora:
# see tools/sanitize.sh (it builds in build/sanitize, never over the checkout's extension)
sanitize: install-fuzz
	PYTHON=$(PYTHON) tools/sanitize.sh

# the fuzzers, briefly (longer runs: tools/fuzz.py --help, tools/fuzz_cov.py)
fuzz: install-fuzz
	$(PYTHON) tools/fuzz.py --seconds 60
	$(PYTHON) tools/fuzz_cov.py json -max_total_time=60
	$(PYTHON) tools/fuzz_cov.py dataset -max_total_time=60

bench: install-test
	$(PYTHON) tools/bench_reader.py
	$(PYTHON) tools/bench_build.py

clean:
	rm -rf build site .pytest_cache .hypothesis
