#!/usr/bin/env bash
# GPU checks on a machine with CUDA torch but without network: install carried wheels, run
# the test suite (GPU tests included) and the step-time benchmark on a ~0.5B random Llama.
# Usage (repo root): bash scripts/gpu_check.sh [out_dir]
# Expects .whl/ (hydra-core, omegaconf, antlr4, datasets, dill, multiprocess, nltk,
# rouge-score wheels; for the ZeRO-2 checks also deepspeed (`pip wheel --no-deps
# deepspeed==0.19.8`), hjson, ninja, py-cpuinfo, msgpack, einops) and .gpucache/ (SmolLM2
# tokenizer files, superni/ copy). The ZeRO-2 single-GPU run is tests/test_gpu.py.
set -eo pipefail
OUT=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export BADIT_CACHE_DIR=$PWD/.gpucache/badit_exp SUPERNI_ROOT=$PWD/.gpucache/superni
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log" || true
python3 benchmarks/step_time.py --model tiny-llama --data "$SUPERNI_ROOT" --cache "$BADIT_CACHE_DIR" \
  --batch-size 8 --seq-len 1024 --steps 10 --rounds 3 --steps-per-epoch 30 \
  --override model.tiny.hidden_size=2048 --override model.tiny.intermediate_size=5632 \
  --override model.tiny.num_hidden_layers=8 --override model.tiny.num_attention_heads=16 \
  --override model.tiny.num_key_value_heads=8 --override model.tiny.head_dim=128 \
  --override model.dtype=bfloat16 > "$OUT/bench_gpu.json" 2> "$OUT/bench_gpu.err" || tail -20 "$OUT/bench_gpu.err"
python3 -c "import json; d=json.load(open('$OUT/bench_gpu.json')); d.pop('provenance'); print(json.dumps(d, indent=1))"
