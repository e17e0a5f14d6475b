# make bench   the Spec-Bench sweep on MODEL (default: the embedded gemma-3-270m); quick profile without a GPU
# make test    the whole test suite
# Both create .venv and install the pinned dependencies on first use.
SHELL := /bin/bash
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= gemma-3-270m
METHODS ?=
LIMIT ?=
MAX_NEW_TOKENS ?=
RUNS ?= 1
DEVICE ?= auto
DTYPE ?= auto
MATMUL ?= auto
# TEMPERATURE=T samples from softmax(logits / T) (0 or empty: greedy); SEED=S seeds it
TEMPERATURE ?=
SEED ?=
# LAUNCHER=ray spreads the sweep over a Ray cluster (RAY_ADDRESS=auto joins the one started with `ray start`;
# without it, a cluster of this machine alone). The full GPU settings apply when the cluster has GPUs.
LAUNCHER ?=
RAY_ADDRESS ?=
CELLS_PER_GROUP ?=
GPUS_PER_CELL ?=
GPU_CHECK_LOCAL = import sys, torch; sys.exit(0 if torch.cuda.is_available() and '$(DEVICE)' != 'cpu' else 1)
GPU_CHECK_RAY = import sys, ray; ray.init(address='$(RAY_ADDRESS)', logging_level='ERROR'); \
  sys.exit(0 if ray.cluster_resources().get('GPU', 0) and '$(DEVICE)' != 'cpu' else 1)
GPU_CHECK = $(if $(and $(filter ray,$(LAUNCHER)),$(RAY_ADDRESS)),$(GPU_CHECK_RAY),$(GPU_CHECK_LOCAL))
# A GPU that nvidia-smi sees but torch cannot use stops `make bench` with the reason and the fix
# (DEVICE=cpu runs on the CPU on purpose).
UNUSABLE_GPU = import sys; from bench.device import unusable_gpu_problem; problem = unusable_gpu_problem(); \
  sys.exit('error: ' + problem if problem and '$(DEVICE)' != 'cpu' else 0)
# The pinned question file; without it the runner downloads it once (or says how to provide it).
QUESTIONS ?= $(or $(SPEC_BENCH_QUESTIONS),$(wildcard ../shared/spec_bench/question.jsonl))
# Quick CPU profile: a few questions per group and short answers (about 15 minutes on 2 cores).
CPU_LIMIT := 2
CPU_MAX_NEW_TOKENS := 128

METHOD ?=
TRAIN_MINUTES ?= 50

# make regress: a small fixed sweep on the embedded model, compared with the committed results/regress.
REGRESS_BASELINE := results/regress
REGRESS_OUT ?= runs/regress
REGRESS_METHODS := vanilla,pld,kangaroo,kangaroo+draft_vocab=0,medusa,eagle2
# One short question per group, every method timed right after vanilla on each question (--order
# question), because this host's speed drifts up to 2x within minutes. One question's speedup is
# still at the mercy of a drift between two generations, so speedup is enforced on the overall
# rows (6 questions) only and the category rows warn; τ, losslessness and the schema are checked
# tightly on every row (README, "Comparing runs").
REGRESS_TOLERANCE ?= tau=0.01,speedup=0.5
REGRESS_MIN_QUESTIONS ?= 6

.PHONY: bench test regress regress-baseline reference train install constraints clean-venv help gpu-check

help:
	@echo "make bench [MODEL=gemma-3-270m] [METHODS=a,b] [LIMIT=N] [MAX_NEW_TOKENS=N] [RUNS=R] [OUT=DIR] [TEMPERATURE=T SEED=S]"
	@echo "           [ORDER=method|question]   # run order (default: question on CPU, method on a GPU)"
	@echo "           [LAUNCHER=ray [RAY_ADDRESS=auto|HEAD:6379] [CELLS_PER_GROUP=N] [GPUS_PER_CELL=N]]"
	@echo "make test"
	@echo "make regress       # a 5-minute sweep compared with results/regress (exit 1 on a regression)"
	@echo "make reference     # rerun the committed results/reference (about 85 minutes on 2 cores)"
	@echo "make train MODEL=gemma-3-270m METHOD=kangaroo|medusa [TRAIN_MINUTES=50]"
	@echo "make gpu-check [DEVICE=cpu] [OUT=DIR]   # GPU self-test on the system python (no install)"
	@echo "make constraints   # re-pin constraints.txt from the current .venv after a deliberate upgrade"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,ray]"
	@touch $@

install: $(STAMP)

bench: $(STAMP)
	@$(PY) -c "$(UNUSABLE_GPU)"
	@if $(PY) -c "$(GPU_CHECK)"; then \
	  limit="$(LIMIT)"; tokens="$(or $(MAX_NEW_TOKENS),1024)"; profile=full; order="$(or $(ORDER),method)"; \
	  echo "GPU found: full Spec-Bench settings ($${limit:-all} questions per group, $$tokens new tokens, the family's GPU dtype)"; \
	else \
	  limit="$(or $(LIMIT),$(CPU_LIMIT))"; tokens="$(or $(MAX_NEW_TOKENS),$(CPU_MAX_NEW_TOKENS))"; profile=cpu-quick; \
	  order="$(or $(ORDER),question)"; \
	  echo "No GPU: quick CPU profile ($$limit questions per group, $$tokens new tokens; about 15 minutes on 2 cores)."; \
	  echo "Override with LIMIT=, MAX_NEW_TOKENS=, METHODS=; on a GPU box the same command runs all 480 questions."; \
	fi; \
	out="$(or $(OUT),runs/$(MODEL)-$$profile$${limit:+-limit$$limit}-$${tokens}tok)"; \
	$(PY) -m bench run --model $(MODEL) --max-new-tokens $$tokens $${limit:+--limit $$limit} \
	  --runs $(RUNS) --device $(DEVICE) --dtype $(DTYPE) --matmul $(MATMUL) --order $$order --out "$$out" \
	  $(if $(METHODS),--methods $(METHODS)) $(if $(QUESTIONS),--questions $(QUESTIONS)) \
	  $(if $(TEMPERATURE),--temperature $(TEMPERATURE)) $(if $(SEED),--seed $(SEED)) \
	  $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(filter ray,$(LAUNCHER)),$(if $(RAY_ADDRESS),--ray-address \
	  $(RAY_ADDRESS)) $(if $(CELLS_PER_GROUP),--cells-per-group $(CELLS_PER_GROUP)) \
	  $(if $(GPUS_PER_CELL),--gpus-per-cell $(GPUS_PER_CELL) --device-map auto))

test: $(STAMP)
	$(PY) -m pytest -q

regress: $(STAMP)
	@test -f $(REGRESS_BASELINE)/config.json || { echo "no $(REGRESS_BASELINE)/config.json: create it with make regress-baseline"; exit 2; }
	rm -rf $(REGRESS_OUT)
	$(PY) -m bench run --config $(REGRESS_BASELINE)/config.json --out $(REGRESS_OUT) $(if $(QUESTIONS),--questions $(QUESTIONS))
	$(PY) -m bench compare $(REGRESS_BASELINE) $(REGRESS_OUT) --tolerance $(REGRESS_TOLERANCE) \
	  --speedup-min-questions $(REGRESS_MIN_QUESTIONS)

# Rewrites the committed baseline: run it on a quiet machine and commit results/regress.
regress-baseline: $(STAMP)
	rm -rf $(REGRESS_BASELINE)
	$(PY) -m bench run --model gemma-3-270m --methods $(REGRESS_METHODS) --limit 1 --max-new-tokens 64 \
	  --device cpu --dtype float32 --matmul auto --order question --out $(REGRESS_BASELINE) $(if $(QUESTIONS),--questions $(QUESTIONS))

# The committed reference run (README, "Reference results"): every shipped method, the six groups,
# 3 questions per group, 128 new tokens, 3 runs, plus the step-cost profile; 40 to 70 minutes on
# the 2-core EPYC, as its memory speed goes. Run it on a quiet machine: nothing else may share the
# cores while it times.
REFERENCE_OUT ?= results/reference
reference: $(STAMP)
	rm -rf $(REFERENCE_OUT)
	$(PY) -m bench run --model gemma-3-270m --limit 3 --max-new-tokens 128 --runs 3 \
	  --device cpu --dtype float32 --matmul auto --order question --out $(REFERENCE_OUT) --no-report $(if $(QUESTIONS),--questions $(QUESTIONS))
	$(PY) -m bench profile --model gemma-3-270m --device cpu --matmul auto --out $(REFERENCE_OUT)
	$(PY) -m bench report $(REFERENCE_OUT)

# The GPU self-test (README, "Checking a GPU box"): the system's own python, torch and transformers,
# no virtualenv and no install, so it runs from a plain checkout on an offline cluster node.
# DEVICE=cpu runs the dry run on the tiny models.
gpu-check:
	$(PYTHON_SYSTEM) -m bench gpu-check $(if $(filter cpu,$(DEVICE)),--device cpu) $(if $(OUT),--out $(OUT))

train: $(STAMP)
	@test -n "$(METHOD)" || { echo "make train needs METHOD=kangaroo, METHOD=medusa or METHOD=eagle2"; exit 2; }
	$(PY) -m bench train --model $(MODEL) --method $(METHOD) --minutes $(TRAIN_MINUTES)

constraints: $(STAMP)
	@{ echo "# Pinned versions of every dependency (make installs with -c constraints.txt). Regenerate with \`make constraints\` after a deliberate upgrade."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt

clean-venv:
	rm -rf $(VENV)
