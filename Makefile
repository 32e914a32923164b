# falcon-svc: `make run` starts the service, `make test` proves it.
# Both install what they need (system packages via apt, Python packages in .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL_DIR ?= models/sentiment
BIND ?= 127.0.0.1:8000
STAMP := $(VENV)/.installed

.PHONY: help venv deploy-tools run test lint model bench e2e e2e-up e2e-check e2e-down clean system-deps

help:  ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

system-deps:  ## Install the Debian/Ubuntu packages (apt, as root or via sudo)
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt setup.cfg pyproject.toml
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e .
	@touch $@

venv: $(STAMP)  ## Create .venv with the pinned packages

# Ansible and ansible-lint live in their own venv: the service never imports them.
DEPLOY_STAMP := .venv-deploy/.installed

$(DEPLOY_STAMP): requirements-deploy.txt
	$(PYTHON) -m venv .venv-deploy
	.venv-deploy/bin/python -m pip install -q --upgrade pip
	.venv-deploy/bin/python -m pip install -q -r requirements-deploy.txt
	@touch $@

deploy-tools: $(DEPLOY_STAMP)  ## Create .venv-deploy with ansible-core and ansible-lint

model: $(STAMP)  ## Train the model unless a valid one of the current format is there
	$(PY) scripts/train_model.py --output-dir $(MODEL_DIR)

run: $(STAMP) model  ## Start the service on $(BIND) with 2 workers
	@echo
	@echo "falcon-svc on http://$(BIND) -- try:"
	@echo "  curl -s http://$(BIND)/infer -H 'Content-Type: application/json' -d '{\"text\": \"The delivery was quick and the staff were lovely.\"}'"
	@echo
	@set -a; [ -f .env ] && . ./.env; set +a; \
	  export BIND=$${BIND:-$(BIND)} MODEL_DIR=$${MODEL_DIR:-$(MODEL_DIR)}; \
	  $(VENV)/bin/falcon-svc migrate --if-reachable; \
	  exec $(VENV)/bin/falcon-svc serve

# Integration tests start real servers from these packages (on free ports).
TEST_SYSTEM_PACKAGES := redis-server postgresql prometheus prometheus-node-exporter prometheus-alertmanager

test: $(STAMP) $(DEPLOY_STAMP) model  ## Run lint and the whole test suite
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh $(TEST_SYSTEM_PACKAGES)
	$(VENV)/bin/ruff check .
	FALCON_REQUIRE_MODEL=1 $(VENV)/bin/pytest

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

bench: $(STAMP) model  ## Benchmarks: fast path vs predict_proba; HTTP (wrk): worker classes, full path
	$(PY) scripts/bench_model.py --model-dir $(MODEL_DIR)
	bash scripts/bench_http.sh
	$(PY) scripts/bench_full.py

# End to end on a Debian 12 host booted with systemd-nspawn (root; see
# docs/UBUNTU_DEPLOYMENT.md and ../shared/SYSTEMD_HOST.md). Ports 80, 2222, 5432,
# 6379, 8001-8002, 8080, 9090, 9100, 9113, 9121, 9187 of this machine must be free.
e2e-up: $(DEPLOY_STAMP)  ## Boot and provision the nspawn host, leave it running, print ssh and URL
	bash scripts/e2e.sh up

e2e-check:  ## Run the end-to-end checks and fault scripts against the running e2e host
	bash scripts/e2e_checks.sh

e2e-down:  ## Shut the nspawn host down
	bash scripts/e2e.sh down

e2e: $(DEPLOY_STAMP)  ## Boot, provision twice (changed=0), all checks and fault scripts, shut down
	bash scripts/e2e.sh test

clean:  ## Remove the venv, the model and caches
	rm -rf $(VENV) .venv-deploy models .pytest_cache .ruff_cache .hypothesis *.egg-info
