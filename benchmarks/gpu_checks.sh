#!/usr/bin/env bash
# Every GPU measurement and check of the real FLUX.2 [klein] path in one run, most important
# first, inside a time budget: a stage starts only if the budget still holds its minimum, and is
# cut at what is left. Each stage writes its own log into OUT_DIR.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [BUDGET_SECONDS [LOGS]]   (default budget 540 s)
#
# LOGS, a regular expression, keeps only the stages whose log name matches (e.g. 'sweep|compiled').
#
# Stages: the device (bf16 matmul rate); 9B training step with gradient checkpointing at
# 512/768/1024 px; the real-size 9B sweep (gpu test); the other gpu tests; sampling s/image
# (9B); 9B without checkpointing; 4B with and without; 9B with compiled blocks; int8 / fp8 base
# weights.
# Random weights of the real architectures throughout: nothing is downloaded.
set -u
OUT_DIR=${1:?usage: gpu_checks.sh OUT_DIR [BUDGET_SECONDS]}
BUDGET=${2:-540}
ONLY=${3:-.}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)

stage() {  # stage LOG MIN_SECONDS MAX_SECONDS COMMAND...
  local log=$1 min=$2 max=$3; shift 3
  [[ $log =~ $ONLY ]] || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < min )); then
    echo "== skipped (needs ${min} s, ${left} s left): $*" | tee -a "$OUT_DIR/$log"
    return
  fi
  local limit=$(( left < max ? left : max ))
  echo "== $(date +%T) [limit ${limit} s] $*" | tee -a "$OUT_DIR/$log"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$OUT_DIR/$log" 2>&1
  echo "== rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/$log"
}

device_facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import importlib.metadata as md, sys, time, torch
print("python", sys.version.split()[0], "|", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "diffusers", "transformers", "peft", "accelerate", "mlflow", "optuna", "torchao")))
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ a
torch.cuda.synchronize()
print(f"bf16 matmul 8192^3: {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
EOF
}

export -f device_facts  # timeout runs programs, not functions
stage device.txt 20 60 bash -c device_facts
stage train_9b.txt 90 150 python3 benchmarks/bench_train_step.py --model 9b --resolutions 512 768 1024 --steps 8 --warmup 2 --profile
stage sweep_9b.txt 200 300 python3 -m pytest -m gpu -n 0 -s -q tests/test_gpu.py -k real_size
stage gpu_tests.txt 60 150 python3 -m pytest -m gpu -n 0 -q tests/test_gpu.py -k "not real_size"
stage sampling.txt 60 120 python3 benchmarks/bench_sampling.py --model 9b --batch-size 2
stage train_9b.txt 50 90 python3 benchmarks/bench_train_step.py --model 9b --resolutions 512 1024 --steps 8 --warmup 2 --no-gradient-checkpointing
stage train_4b.txt 50 80 python3 benchmarks/bench_train_step.py --model 4b --resolutions 512 768 1024 --steps 8 --warmup 2
stage train_4b.txt 40 60 python3 benchmarks/bench_train_step.py --model 4b --resolutions 1024 --steps 8 --warmup 2 --no-gradient-checkpointing
stage compiled.txt 80 120 python3 benchmarks/bench_train_step.py --model 9b --resolutions 1024 --steps 8 --warmup 3 --compile --profile
stage compiled.txt 60 100 python3 benchmarks/bench_train_step.py --model 9b --resolutions 1024 --steps 8 --warmup 3 --compile --no-gradient-checkpointing
stage quantized.txt 50 80 python3 benchmarks/bench_train_step.py --model 9b --resolutions 1024 --steps 8 --warmup 2 --quantize int8
stage quantized.txt 50 80 python3 benchmarks/bench_train_step.py --model 9b --resolutions 1024 --steps 8 --warmup 2 --quantize fp8
echo "== all stages done in $(( $(date +%s) - START )) s"
