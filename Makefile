# `make demo` and `make test` each work on a fresh machine: they create .venv if missing and install first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist, each test file in one process): 2 fills this 2-core box (the suite alone keeps
# ~1.3 cores busy); 0 runs everything in this process.
TEST_WORKERS ?= 2

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m jaxserve.launch.demo            # offline API: multi-turn chat, per-turn cached tokens and TTFT
	$(VENV)/bin/python -m jaxserve.launch.demo_cluster    # the same chat through a local gRPC cluster and the client

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/python -m pytest -q -x --durations=15 \
		-n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV)
