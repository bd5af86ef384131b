# bpsim: two commands for a newcomer.
#   make lab    set up .venv (if needed) and open the course in JupyterLab (student notebooks;
#               make lab-solutions opens the executed ones with solutions)
#   make test   set up .venv (if needed) and run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bpsim-installed
# CPU wheel of torch unless this machine has an NVIDIA driver (see README).
TORCH_CPU ?= torch==2.13.0
NBVAL_FLAGS := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg -p no:randomly

.PHONY: setup lab lab-solutions students test test-unit test-notebooks test-notebooks-kernels test-browser notebooks check bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "nvidia-smi found: installing the default (CUDA) build of torch"; \
	  $(BIN)/python -m pip install --quiet torch; \
	else \
	  echo "no nvidia-smi: installing the CPU build of torch"; \
	  $(BIN)/python -m pip install --quiet "$(TORCH_CPU)" || \
	  $(BIN)/python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name bpsim --display-name "Python (bpsim)" >/dev/null
	@touch $(STAMP)

# Student notebooks: the lessons with every exercise's solution replaced by a stub, written by
# `bpsim course student` into the git-ignored student/ and rewritten whenever a lesson changes.
LESSONS := $(wildcard lessons/[0-9][0-9]-*.py)
STUDENT := student
STUDENT_STAMP := $(STUDENT)/.built
# jupyter lab on $(1); opens a browser where there is a display
jupyter_lab = if [ -n "$$DISPLAY" ] || [ "$$(uname)" = Darwin ]; then open=""; else open="--no-browser"; fi; \
	if [ "$$(id -u)" = 0 ]; then open="$$open --allow-root"; fi; \
	echo "Opening $(1); if no browser opens, paste the http://127.0.0.1 URL printed below."; \
	$(BIN)/jupyter lab $$open --ip=127.0.0.1 $(1)

$(STUDENT_STAMP): $(LESSONS) bpsim/course/build.py | $(STAMP)
	$(BIN)/bpsim course student >/dev/null
	@touch $@

students: $(STUDENT_STAMP)

# the course as a student meets it: exercises to fill in, no solutions
lab: $(STAMP) $(STUDENT_STAMP)
	@$(call jupyter_lab,$(STUDENT)/00-start-here.ipynb)

# the executed instructor notebooks, solutions included
lab-solutions: $(STAMP)
	@$(call jupyter_lab,notebooks/00-start-here.ipynb)

test: $(STAMP)
	@total=$$SECONDS; \
	t=$$SECONDS; $(MAKE) --no-print-directory test-unit || exit 1; \
	echo "== unit tests: $$((SECONDS - t)) s"; \
	t=$$SECONDS; $(MAKE) --no-print-directory test-notebooks || exit 1; \
	echo "== notebooks (nbval): $$((SECONDS - t)) s"; \
	t=$$SECONDS; $(MAKE) --no-print-directory test-notebooks-kernels || exit 1; \
	echo "== notebooks with other floating-point kernels (nbval): $$((SECONDS - t)) s"; \
	t=$$SECONDS; $(MAKE) --no-print-directory check || exit 1; \
	echo "== course check: $$((SECONDS - t)) s"; \
	t=$$SECONDS; $(MAKE) --no-print-directory test-browser || exit 1; \
	echo "== browser test (lesson 06 in JupyterLab): $$((SECONDS - t)) s"; \
	echo "== make test total: $$((SECONDS - total)) s"

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

# the executed notebooks against their stored outputs, and the student notebooks run top to bottom
test-notebooks: $(STAMP) $(STUDENT_STAMP)
	BPSIM_FAST=1 $(BIN)/python -m pytest $(NBVAL_FLAGS) notebooks $(STUDENT) -q

# The executed notebooks again with other floating-point kernels, as another processor would pick them (ATen's
# portable kernels instead of AVX2/AVX-512, MKL at SSE4.2, oneDNN at SSE4.1): the outputs nbval compares must be
# the same on every machine, so a cell whose text depends on the kernels fails here.
OTHER_KERNELS := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
test-notebooks-kernels: $(STAMP)
	$(OTHER_KERNELS) BPSIM_FAST=1 $(BIN)/python -m pytest $(NBVAL_FLAGS) notebooks -q

check: $(STAMP)
	$(BIN)/bpsim course check

# A real browser (Debian's chromium, driven by Playwright without a browser
# download) runs lesson 06 in JupyterLab, moves a slider and checks the figure redrew.
test-browser: $(STAMP)
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --quiet "playwright>=1.45"
	@command -v chromium >/dev/null 2>&1 || apt-get install -y chromium >/dev/null 2>&1 || \
	  (apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1) || true
	@if command -v chromium >/dev/null 2>&1; then \
	  BPSIM_BROWSER=1 $(BIN)/python -m pytest tests/browser -q; \
	else \
	  echo "browser test NOT RUN: Debian's chromium is missing and could not be installed (apt-get install chromium)"; \
	fi

notebooks: $(STAMP)
	BPSIM_FAST=1 $(BIN)/bpsim course build

bench: $(STAMP)
	@for s in benchmarks/[!_]*.py; do echo "== $$s"; $(BIN)/python $$s --quick || exit 1; done

# Every committed result in benchmarks/results/, regenerated from the current commit, each stamped with its
# provenance and fingerprints (tests/test_results.py). Commit the code first: a result made with uncommitted
# changes fails that test. About 4.5 hours on one quiet core (README, Benchmarks); `make results RESULTS=theory`
# runs only the lines whose result name contains that word.
RESULT_RUNS := \
  theory:benchmarks/theory.py \
  memory:benchmarks/memory.py \
  simspeed:benchmarks/simspeed.py \
  costmodel:benchmarks/costmodel.py \
  throughput:benchmarks/throughput.py \
  fidelity:benchmarks/fidelity.py \
  accuracy_dgl_async_digits:benchmarks/accuracy_dgl.py@--data@digits@--only@async_slowdown@async_buffer@--seeds@0@1@2@3@4@--epochs@4@--name@accuracy_dgl_async_digits \
  accuracy_dgl_greedy_digits_4ep:benchmarks/accuracy_dgl.py@--data@digits@--only@greedy@--seeds@0@1@2@3@4@--epochs@4@--name@accuracy_dgl_greedy_digits_4ep \
  accuracy_dgl_greedy_digits:benchmarks/accuracy_dgl.py@--data@digits@--only@greedy@--seeds@0@1@2@3@4@--epochs@15@--name@accuracy_dgl_greedy_digits \
  accuracy_blockprop:benchmarks/accuracy_blockprop.py@--epochs@10@--seeds@0@1@2 \
  accuracy_dgl:benchmarks/accuracy_dgl.py@--only@bwbpf@--seeds@0@1@2 \
  accuracy_dgl_vs_bp:benchmarks/accuracy_dgl.py@--only@dgl_vs_bp@aux@--n-train@10000@--n-test@10000@--epochs@12@--weight-decay@5e-4@--seeds@0@1@2@--name@accuracy_dgl_vs_bp \
  accuracy_dgl_vs_bp_20k:benchmarks/accuracy_dgl.py@--only@dgl_vs_bp@--n-train@20000@--n-test@10000@--epochs@12@--weight-decay@5e-4@--seeds@0@1@2@--name@accuracy_dgl_vs_bp_20k \
  blockprop_depth:benchmarks/blockprop_depth.py@--variants@default@fixed@decreasing-lam@--mnist-train@20000@--mnist-test@5000@--out@build/blockprop_depth/p1 \
  blockprop_depth:benchmarks/blockprop_depth.py@--variants@exact-h@--no-bp@--data@digits@--out@build/blockprop_depth/p2 \
  blockprop_depth:benchmarks/blockprop_depth.py@--variants@exact-h@--no-bp@--data@mnist@--blocks@4@--mnist-train@20000@--mnist-test@5000@--out@build/blockprop_depth/p3 \
  blockprop_depth:benchmarks/blockprop_depth.py@--merge@build/blockprop_depth/p1@build/blockprop_depth/p2@build/blockprop_depth/p3
RESULTS ?=

results: $(STAMP)
	@git diff --quiet HEAD -- bpsim benchmarks/*.py || echo "warning: uncommitted changes in bpsim/ or benchmarks/: tests/test_results.py will refuse these results"
	@total=$$SECONDS; for run in $(RESULT_RUNS); do name=$${run%%:*}; cmd=$${run#*:}; \
	  case "$$name" in *"$(RESULTS)"*) ;; *) continue;; esac; \
	  t=$$SECONDS; echo "== $$name: python $${cmd//@/ }"; \
	  $(BIN)/python $${cmd//@/ } >/dev/null || exit 1; echo "== $$name: $$((SECONDS - t)) s"; done; \
	  $(BIN)/python -m bpsim.course.claims; echo "== make results: $$((SECONDS - total)) s"

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis $(STUDENT)
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
