#!/usr/bin/env bash
# GPU checks on a machine with CUDA torch but without network: install the carried wheels, run
# the GPU tests (bf16 training, ZeRO-2 bf16 on one GPU over NCCL, FlashAttention-2 if
# installed, DOG on the device and overlapped), the DOG regroup benchmark (36 Qwen3-8B-shaped
# layers) and the step-time benchmark on a ~0.5B random Llama. The CPU suite runs in CI.
# Usage (repo root): bash scripts/gpu_check.sh [out_dir]
# Expects .whl/ (hydra-core, omegaconf, antlr4-python3-runtime, datasets, dill, multiprocess,
# nltk, rouge-score, hjson, deepspeed (`pip wheel --no-deps deepspeed==0.19.8`)) and
# .gpucache/ (SmolLM2 tokenizer files in badit_exp/smollm2-135m-instruct/, a superni/ copy).
set -o pipefail
OUT=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export BADIT_CACHE_DIR=$PWD/.gpucache/badit_exp SUPERNI_ROOT=$PWD/.gpucache/superni
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -30 | tee "$OUT/pytest_gpu.log"
python3 benchmarks/dog_regroup.py regroup --device cuda --out "$OUT/dog_regroup_cuda.json" 2>&1 | tail -20
python3 benchmarks/step_time.py --model tiny-llama --data "$SUPERNI_ROOT" --cache "$BADIT_CACHE_DIR" \
  --batch-size 8 --seq-len 1024 --steps 10 --rounds 2 --steps-per-epoch 30 \
  --override model.tiny.hidden_size=2048 --override model.tiny.intermediate_size=5632 \
  --override model.tiny.num_hidden_layers=8 --override model.tiny.num_attention_heads=16 \
  --override model.tiny.num_key_value_heads=8 --override model.tiny.head_dim=128 \
  --override model.dtype=bfloat16 > "$OUT/bench_gpu.json" 2> "$OUT/bench_gpu.err" || tail -20 "$OUT/bench_gpu.err"
python3 -c "import json; d=json.load(open('$OUT/bench_gpu.json')); d.pop('provenance'); print(json.dumps(d, indent=1))"
# the step at the paper's per-device batch 1 (issue 27): the floor behind `study plan`'s GPU-hours
# estimate (estimate.step_floor_s in conf/study/study_gpu_qwen3_4b.yaml, now an assumption)
python3 benchmarks/step_time.py --model tiny-llama --data "$SUPERNI_ROOT" --cache "$BADIT_CACHE_DIR" \
  --batch-size 1 --seq-len 512 --steps 20 --rounds 2 --steps-per-epoch 30 --only lora,loramoe,badit \
  --override model.tiny.hidden_size=2048 --override model.tiny.intermediate_size=5632 \
  --override model.tiny.num_hidden_layers=8 --override model.tiny.num_attention_heads=16 \
  --override model.tiny.num_key_value_heads=8 --override model.tiny.head_dim=128 \
  --override model.dtype=bfloat16 > "$OUT/bench_gpu_batch1.json" 2> "$OUT/bench_gpu_batch1.err" || tail -20 "$OUT/bench_gpu_batch1.err"
