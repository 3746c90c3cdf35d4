# Two entry points for a fresh machine: `make demo` and `make test`. Both build the venv on demand.
# the first supported Python found (the package needs 3.10 or newer); `make test PYTHON=...` picks one
PYTHON ?= $(firstword $(shell for p in python3.11 python3.12 python3.10 python3; do command -v $$p; done 2>/dev/null))
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml infra/constraints-cpu.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "kimi-label needs Python 3.10 or newer; $(PYTHON) is older (make PYTHON=python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c infra/constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

# two workers (pytest-xdist), each taking the next test when it is free: the suite waits on
# services and subprocesses as much as it computes
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

demo: $(STAMP)
	$(PY) -m flows.console demo

bench: $(STAMP)
	$(PY) bench/cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
