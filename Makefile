# meshlet — the two commands first: `make demo` runs the mesh, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything we wrote, type-checked strictly (generated protobuf code excepted in pyproject).
MYPY_TARGETS := meshlet certs control_plane sidecar

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
