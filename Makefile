# Two entry points for a fresh machine: `make demo` and `make test`. Both build the venv on demand.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml infra/constraints-cpu.txt
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
