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
# The pinned question file; without it the runner downloads it once (or says how to provide it).
QUESTIONS ?= $(or $(SPEC_BENCH_QUESTIONS),$(wildcard ../shared/spec_bench/question.jsonl))
# Quick CPU profile: a few questions per group and short answers (about 15 minutes on 2 cores).
CPU_LIMIT := 2
CPU_MAX_NEW_TOKENS := 128

METHOD ?=
TRAIN_MINUTES ?= 50

.PHONY: bench test train install constraints clean-venv help

help:
	@echo "make bench [MODEL=gemma-3-270m] [METHODS=a,b] [LIMIT=N] [MAX_NEW_TOKENS=N] [RUNS=R] [OUT=DIR]"
	@echo "make test"
	@echo "make train MODEL=gemma-3-270m METHOD=kangaroo|medusa [TRAIN_MINUTES=50]"
	@echo "make constraints   # re-pin constraints.txt from the current .venv after a deliberate upgrade"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $@

install: $(STAMP)

bench: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and '$(DEVICE)' != 'cpu' else 1)"; then \
	  limit="$(LIMIT)"; tokens="$(or $(MAX_NEW_TOKENS),1024)"; profile=full; \
	  echo "GPU found: full Spec-Bench settings ($${limit:-all} questions per group, $$tokens new tokens, the family's GPU dtype)"; \
	else \
	  limit="$(or $(LIMIT),$(CPU_LIMIT))"; tokens="$(or $(MAX_NEW_TOKENS),$(CPU_MAX_NEW_TOKENS))"; profile=cpu-quick; \
	  echo "No GPU: quick CPU profile ($$limit questions per group, $$tokens new tokens; about 15 minutes on 2 cores)."; \
	  echo "Override with LIMIT=, MAX_NEW_TOKENS=, METHODS=; on a GPU box the same command runs all 480 questions."; \
	fi; \
	out="$(or $(OUT),runs/$(MODEL)-$$profile$${limit:+-limit$$limit}-$${tokens}tok)"; \
	$(PY) -m bench run --model $(MODEL) --max-new-tokens $$tokens $${limit:+--limit $$limit} \
	  --runs $(RUNS) --device $(DEVICE) --dtype $(DTYPE) --out "$$out" \
	  $(if $(METHODS),--methods $(METHODS)) $(if $(QUESTIONS),--questions $(QUESTIONS))

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	@test -n "$(METHOD)" || { echo "make train needs METHOD=kangaroo or METHOD=medusa"; exit 2; }
	$(PY) -m bench train --model $(MODEL) --method $(METHOD) --minutes $(TRAIN_MINUTES)

constraints: $(STAMP)
	@{ echo "# Pinned versions of every dependency (make installs with -c constraints.txt). Regenerate with \`make constraints\` after a deliberate upgrade."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt

clean-venv:
	rm -rf $(VENV)
