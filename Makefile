# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment on first use (about 3 minutes).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench reference clean

install: $(VENV)/.installed

# The venv's activate script also turns Flower's telemetry off and keeps `flwr run` from
# installing the app's dependencies at run time (a local SuperLink reads this when it starts).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	grep -q FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION $(BIN)/activate || \
		printf '\n# fedmed (Makefile): no telemetry; `flwr run` installs nothing at run time\nexport FLWR_TELEMETRY_ENABLED=0\nexport FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\n' >> $(BIN)/activate
	touch $@

demo: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedmed simulate simulations/quickstart.toml

# The layers contract and the linter first (seconds), then the suite on both cores: the
# deployment tests on one worker, the Ray tests on the other, the rest beside them
# (tests/conftest.py's scheduler).
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check fedmed tests benchmarks
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -n 2 --durations=15

bench: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/data_load.py
	$(BIN)/python benchmarks/dp_overhead.py
	$(BIN)/python benchmarks/audit.py
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python benchmarks/sweep.py
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python benchmarks/deployment.py

# docs/config.md and pyproject.toml's Flower run config, from the config schema.
reference: install
	$(BIN)/python -m fedmed.reference

clean:
	rm -rf $(VENV) runs
