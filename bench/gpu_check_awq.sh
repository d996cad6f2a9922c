#!/usr/bin/env bash
# AWQ's GPU checks, for a machine with a CUDA GPU: the CUDA-marked test, then the benchmark (about 3 minutes
# on an H200, no network needed). Output goes under $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
timeout 240 "$py" -m pytest tests/test_awq.py -q -k cuda -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
timeout 420 "$py" bench/bench_awq.py --cache /tmp/quantspace-bench --json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log"
