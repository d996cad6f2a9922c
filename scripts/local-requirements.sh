#!/usr/bin/env bash
# Print the requirements a CPU-only install uses: requirements.txt with its torch line (the Space's CUDA build)
# replaced by the CPU pin of requirements-cpu.txt. scripts/setup.sh installs this list.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -v '^[[:space:]]*#' requirements-cpu.txt | grep -E '^[[:space:]]*torch[[:space:]]*==' || {
  echo "requirements-cpu.txt has no torch== pin" >&2; exit 1; }
grep -v -E '^[[:space:]]*torch[[:space:]]*(==|>|<|~|!|$|\[)' requirements.txt
