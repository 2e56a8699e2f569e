# Two entry points (README's Quick start): `make demo` runs the main job, `make test` the tests.
# Both create .venv on first use (and again whenever pyproject.toml changes).
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# The TIA2 files: $TIA2_SOURCE if set, else ../shared/data/tia2 when present (else the CLI
# falls back to the public repository and, offline, says how to provide them).
TIA2_SOURCE ?= $(if $(wildcard ../shared/data/tia2/human_annotations),$(abspath ../shared/data/tia2),)
export TIA2_SOURCE
# Steadier timings on a small shared CPU (see ../shared/NOTES.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(VENV)/bin/tia2 benchmark --config tiny

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/metrics_bench.py
