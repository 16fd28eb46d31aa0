# Two commands do everything on a fresh machine:
#   make serve   set up .venv (pinned deps), build the demo student if no MODEL, start the stack
#   make test    set up .venv, Chromium and Prometheus (apt, for their tests), lint and type-check, run the whole suite
# Options: PROFILE=cpu|gpu (default: gpu if nvidia-smi exists), MODEL=DIR, SERVE_ARGS="--port 9000",
#          TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU machines without a local torch wheel),
#          PYTEST_ARGS="-k merge".
VENV ?= .venv
PROFILE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(PROFILE)

.PHONY: setup browser monitoring-tools lint serve test
setup: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/gpu.txt requirements/gpu-nodeps.txt pyproject.toml scripts/install.sh
	scripts/install.sh $(PROFILE) $(VENV)
	touch $@

serve: setup
	$(VENV)/bin/student serve $(if $(MODEL),--model $(MODEL)) $(SERVE_ARGS)

# Only the tests need a browser; does nothing when Chromium is already installed.
browser:
	scripts/install-browser.sh

# Only tests/deploy needs Prometheus and promtool; does nothing when both are installed.
monitoring-tools:
	scripts/install-prometheus.sh

# ruff (lint and format, line length 120) and mypy, as configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup browser monitoring-tools lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
