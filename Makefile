# fedcollab: `make demo` and `make test` set everything up from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-deployment install install-dev lint-imports bench clean schema

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# The constraints file pins the CPU build of torch (see constraints.txt).
$(VENV)/.installed: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[all]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/fedcollab demo --out runs/demo

lint-imports: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports

# The suite, in-process (simulations, protocols, CLI): under 10 minutes on 2 cores.
test: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -m "not deployment" tests

# Deployment end to end: a SuperLink and SuperNodes as processes over TLS (~5 minutes). CI runs both.
test-deployment: $(VENV)/.installed-dev
	$(PY) -m pytest -q -p no:cacheprovider -m deployment tests

schema: $(VENV)/.installed
	$(VENV)/bin/fedcollab spec schema --out schemas

bench: $(VENV)/.installed
	$(PY) benchmarks/utility.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/secagg.py
	$(PY) benchmarks/distributed_dp.py
	$(PY) benchmarks/scoring.py
	$(PY) benchmarks/he.py
	$(PY) benchmarks/analytics.py
	$(PY) benchmarks/deploy.py
	$(PY) benchmarks/trees.py
	$(PY) benchmarks/vertical.py

clean:
	rm -rf $(VENV) runs
