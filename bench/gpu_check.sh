#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA GPU and no network (about 5 minutes on an
# H200). Packages the machine lacks travel as wheels in .whl/ (see bench/README.md):
#   .whl/ours  our pinned transformers / huggingface_hub stack, .whl/bnb an unpacked bitsandbytes,
#   .whl/llmc  llm-compressor and its needs (it pins an older transformers, so it gets its own path).
# Output (logs, JSON) goes under $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error
ours=/tmp/site-ours llmc=/tmp/site-llmc
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$ours" .whl/ours/*.whl && cp -r .whl/bnb/. "$ours"/
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$llmc" .whl/llmc/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
PYTHONPATH="$ours:$PWD" timeout 150 "$py" -m pytest tests/test_awq.py -q -k cuda -p no:cacheprovider 2>&1 \
  | tail -5 | tee "$out/pytest.log"
PYTHONPATH="$ours:$PWD" timeout 150 "$py" bench/gpu_pipeline.py "$out" 2>&1 | tail -20 | tee "$out/pipeline.log"
PYTHONPATH="$ours:$PWD" timeout 240 "$py" bench/bench_awq.py --engine ours --cache /tmp/quantspace-bench \
  --json "$out/ours.json" 2>&1 | tail -40 | tee "$out/bench-ours.log"
PYTHONPATH="$llmc:$PWD" timeout 240 "$py" bench/bench_awq.py --engine llmcompressor --cache /tmp/quantspace-bench \
  --against "$out/ours.json" --json "$out/llmc.json" 2>&1 | tail -40 | tee "$out/bench-llmc.log"
