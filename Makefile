# VoxBox: `make run` serves natively on the embedded engine, `make test` runs the whole suite.
# The virtual environment lives outside the clone, keyed by the requirement files' hash, so
# repeated runs (and CI on the same machine) reuse it; a new machine builds it from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VOXBOX_CACHE ?= $(HOME)/.cache/voxbox
REQ_FILES := $(sort $(wildcard requirements/*.txt))
REQ_HASH := $(shell cat $(REQ_FILES) | sha256sum | cut -c1-16)
VENV := $(VOXBOX_CACHE)/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOST ?= 127.0.0.1
PORT ?= 6006
PYTEST_ARGS ?=

.PHONY: run run-worker test deps-runtime deps-test system-run system-test clean-venv bench-overhead

# The whole stack natively: nginx gateway (auth) in front of the worker on the embedded engine.
run: deps-runtime system-run
	PY=$(PY) HOST=$(HOST) GATEWAY_PORT=$(PORT) scripts/run-stack.sh

# Only the worker, no gateway and no auth (development).
run-worker: deps-runtime
	TTS_ENGINE=$${TTS_ENGINE:-embedded} VOICES_DIR=$${VOICES_DIR:-$(CURDIR)/.run/voices} \
		BIND=$(HOST):$${WORKER_PORT:-8000} $(VENV)/bin/gunicorn -c service/gunicorn.conf.py 'service.app:create_app()'

test: deps-test system-test
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The venv directory is named by the requirements' hash, so a stamp inside it is valid for exactly
# that set of requirements: no mtime comparisons (a fresh clone reuses a built venv at once).
deps-runtime: $(VENV)/.runtime-ok
	@ln -sfn $(VENV) .venv
deps-test: deps-runtime $(VENV)/.test-ok

$(VENV)/.runtime-ok:
	@mkdir -p $(VOXBOX_CACHE)
	@# Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements/runtime.txt -r requirements/embedded.txt
	$(PIP) --no-deps -r requirements/voxcpm.txt
	touch $@

$(VENV)/.test-ok: $(VENV)/.runtime-ok
	$(PIP) -r requirements/test.txt
	touch $@

system-run:
	@{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } && command -v envsubst >/dev/null && \
		command -v openssl >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -qq nginx-light gettext-base openssl curl >/dev/null; }

# Real nginx and Chromium for the gateway and browser tests, and a Docker engine (dockerd,
# containerd, runc), debootstrap and a registry for the bundle tests (Debian packages). The bundle
# tests start dockerd themselves when none runs (tests/support/docker_bundle.py).
system-test:
	@if ! command -v nginx >/dev/null || ! command -v envsubst >/dev/null || ! command -v chromium >/dev/null || \
		! command -v chromedriver >/dev/null || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || \
		! command -v docker-registry >/dev/null; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx-light gettext-base \
			chromium chromium-driver apache2-utils docker.io debootstrap docker-registry >/dev/null; \
	fi

bench-overhead: deps-test
	$(PY) bench/overhead.py

clean-venv:
	rm -rf $(VENV) .venv
