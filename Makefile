# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment on first use (about 3 minutes).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedmed simulate simulations/quickstart.toml

test: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/data_load.py
	$(BIN)/python benchmarks/dp_overhead.py
	$(BIN)/python benchmarks/audit.py

clean:
	rm -rf $(VENV) runs
