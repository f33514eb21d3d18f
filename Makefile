# meshlet — the two commands first: `make demo` runs the mesh, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pure cores, type-checked strictly.
MYPY_TARGETS := meshlet/errors.py meshlet/durations.py meshlet/runtime.py meshlet/model.py \
	meshlet/policy.py meshlet/wire.py meshlet/manifest.py \
	certs/spiffe.py certs/pki.py certs/verify.py certs/schedule.py certs/bundle.py certs/meshcheck.py \
	control_plane/registry.py control_plane/health.py control_plane/ca_rules.py control_plane/ca_report.py \
	sidecar/catalog.py sidecar/intercept.py sidecar/dns.py \
	sidecar/balancer.py sidecar/outlier.py sidecar/breaker.py sidecar/retry_budget.py sidecar/backoff.py

.PHONY: demo test bench lint bootstrap clean

demo: $(STAMP)
	$(PY) scripts/demo_certs.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench $(if $(QUICK),--quick,)

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
