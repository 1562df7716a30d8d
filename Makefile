# medseg: the two commands of the README.
#   make demo [DATA=<MSD/nnU-Net folder>]   set up .venv and run the whole workflow on MSD Task04 Hippocampus
#   make test                               set up .venv and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DATA ?=
CORES ?= all
RESULTS ?= data/results
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test venv clean-results bench-ingest

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: venv
	@set -e; \
	if [ -n "$(DATA)" ]; then data="$(DATA)"; \
	else data=$$($(BIN)/medseg fetch-data --task Task04_Hippocampus --output data/raw); fi; \
	$(BIN)/snakemake --cores $(CORES) --configfile configs/experiments/hippocampus.yaml \
	  --config dataset="$$(realpath "$$data")" results=$(RESULTS); \
	$(BIN)/medseg report --results $(RESULTS) --tracking-uri "sqlite:///$$(realpath $(RESULTS))/mlflow.db"

test: venv
	$(BIN)/python -m pytest

# DICOM to NIfTI: medseg against dcm2niix and dicom2nifti on $MEDSEG_DATA/dicom (docs/benchmarks.md)
bench-ingest: venv
	$(BIN)/python -c "import dcm2niix, dicom2nifti" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/ingest.py

clean-results:
	rm -rf $(RESULTS) .snakemake
