# medseg: the two commands of the README.
#   make demo [DATA=<MSD/nnU-Net folder>]   set up .venv and run the whole workflow on MSD Task04 Hippocampus
#     [EXPERIMENT=configs/experiments/hippocampus-full.yaml RESULTS=data/results-full]   the five-fold recipe
#   make test                               set up .venv and run the test suite
# And, for the readers of untrusted files:
#   make fuzz [FUZZ_SECONDS=600]            fuzz the DICOM header reader, series builder and NIfTI loading, each that long
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# The versions CI tested (make lock); CONSTRAINTS= installs without them.
CONSTRAINTS ?= constraints.txt
DATA ?=
CORES ?= all
RESULTS ?= data/results
EXPERIMENT ?= configs/experiments/hippocampus.yaml
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= dicom_header dicom_series nifti
FUZZ_DIR ?= test-artifacts/fuzz
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test fuzz venv lock clean-results bench-ingest bench-loader bench-accuracy bench-channels bench-predict bench-demo gpu-kit bench-deps

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,cluster,server]'
	touch $@

# Record the versions of .venv in constraints.txt (after an upgrade on purpose, once the tests pass).
lock: venv
	@{ sed -n '1,/^# torch is pinned/p' constraints.txt; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-[a-z0-9-]*|triton)==' \
	  | grep -v ' @ '; } > constraints.txt.new && mv constraints.txt.new constraints.txt

demo: venv
	@set -e; \
	if [ -n "$(DATA)" ]; then data="$(DATA)"; \
	else data=$$($(BIN)/medseg fetch-data --task Task04_Hippocampus --output data/raw); fi; \
	$(BIN)/snakemake --cores $(CORES) --configfile $(EXPERIMENT) \
	  --config dataset="$$(realpath "$$data")" results=$(RESULTS); \
	$(BIN)/medseg report --results $(RESULTS) --tracking-uri "sqlite:///$$(realpath $(RESULTS))/mlflow.db"

test: venv
	$(BIN)/python -m pytest

# Coverage-guided fuzzing (atheris, tests/fuzz): each target for FUZZ_SECONDS, one after another, its corpus
# and any crash input in $(FUZZ_DIR)/<target>/. A crash stops its target; the run fails if any target crashed.
fuzz: venv
	@status=0; for target in $(FUZZ_TARGETS); do \
	  echo "fuzzing $$target for $(FUZZ_SECONDS) s (corpus and crashes: $(FUZZ_DIR)/$$target)"; \
	  MEDSEG_FUZZ_DIR=$(FUZZ_DIR) $(BIN)/python tests/fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_SECONDS) \
	    -print_final_stats=1 || status=1; \
	done; exit $$status

# The peers of the benchmarks (docs/benchmarks.md): dcm2niix, dicom2nifti, nnU-Net v2. torch stays at
# $(TORCH): nnunetv2 would otherwise upgrade it through timm and torchvision, which nnU-Net's default
# trainer does not import; they are removed again, as a torchvision built for another torch breaks on import.
bench-deps: venv
	$(BIN)/python -c "import dcm2niix, dicom2nifti, nnunetv2" 2>/dev/null || { \
	  $(BIN)/python -m pip install --quiet -e '.[bench]' "$(TORCH)" && \
	  $(BIN)/python -m pip uninstall --quiet -y torchvision timm; }

# DICOM to NIfTI: medseg against dcm2niix and dicom2nifti on $MEDSEG_DATA/dicom
bench-ingest: bench-deps
	$(BIN)/python bench/ingest.py

# Augmented training samples per second: medseg's loader against nnU-Net's (hippocampus)
bench-loader: bench-deps
	$(BIN)/python bench/loader.py

# Validation Dice against wall time: medseg against nnU-Net v2, 30 minutes each on the CPU (hippocampus)
bench-accuracy: bench-deps
	$(BIN)/python bench/accuracy.py

# Training steps per second in the default and in channels-last memory order (train.channels_last)
bench-channels: venv
	$(BIN)/python bench/channels.py

# Prediction: seconds per case, peak memory and Dice, medseg against nnU-Net v2's predictor
bench-predict: bench-deps
	$(BIN)/python bench/predict.py

# The demo workflow against a plain MONAI script trained as long, on the same validation cases
bench-demo: venv
	$(BIN)/python bench/run.py --data $(if $(DATA),$(DATA),../shared/data/hippocampus)

# The kit that bench/gpu_check.sh takes to a GPU machine with no network (wheels and data, .gpukit/)
gpu-kit: venv
	$(BIN)/python bench/gpu_kit.py

clean-results:
	rm -rf $(RESULTS) .snakemake
