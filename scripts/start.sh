#!/usr/bin/env bash
# Sets up and starts oomlens. Until the dashboard lands (issue #5) this runs the demo LoRA
# training on a tiny model and prints what was recorded for each step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${OOMLENS_VENV:-.venv}"
status=0
"$venv/bin/python" -m trainer run --config examples/tiny-llama-lora.yaml "$@" || status=$?
"$venv/bin/python" -m trainer show latest
exit "$status"
