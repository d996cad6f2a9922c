#!/usr/bin/env bash
# Set up everything (first run builds llama.cpp) and start the app on http://127.0.0.1:7860
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
