# meshlet — the two commands first: `make demo` runs the mesh, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything we wrote, type-checked strictly (generated protobuf code excepted in pyproject).
MYPY_TARGETS := meshlet certs control_plane sidecar node compose

.PHONY: demo demo-certs test bench lint bootstrap clean

# The lab (root, Linux): 2 nodes in network namespaces, the demo services and their traffic,
# the live table for 20 s, then everything removed — also when a step fails or on Ctrl-C.
# Its own run directory and prefix, so it never touches a lab you started yourself.
DEMO_LAB := --run-dir /run/meshlet/demo-lab
demo: $(STAMP)
	@trap '$(PY) -m meshlet lab down $(DEMO_LAB)' EXIT; \
	$(PY) -m meshlet lab up --prefix meshlet-demo $(DEMO_LAB) && \
	$(PY) -m meshlet lab top --seconds 20 $(DEMO_LAB) && \
	$(PY) -m meshlet lab scale shop/orders=4 $(DEMO_LAB) && \
	$(PY) -m meshlet lab top --once --interval 3 $(DEMO_LAB)

# The certificate walkthrough: real mutual TLS on 127.0.0.1, no root needed.
demo-certs: $(STAMP)
	$(PY) scripts/demo_certs.py

test: $(STAMP)
	$(PY) -m pytest -q

# `make bench`: meshlet vs direct vs HAProxy (< 10 min); QUICK=1 (< 2 min); BENCH_ARGS=... passes more.
bench: $(STAMP)
	$(PY) -m bench $(if $(QUICK),--quick,) $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_TARGETS)
	$(VENV)/bin/lint-imports

bootstrap: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh scripts/apt-packages.txt
	bash scripts/bootstrap.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
