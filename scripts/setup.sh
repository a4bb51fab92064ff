#!/usr/bin/env bash
# Creates .venv and installs oomlens's dependencies; fast when nothing changed.
#   OOMLENS_VENV        where the virtual environment lives (default: .venv in the repository)
#   OOMLENS_TORCH       the torch requirement to install first (default: a CPU build on machines
#                       without an NVIDIA GPU, torch from PyPI with CUDA on machines with one)
#   OOMLENS_TORCH_INDEX an extra index for torch, e.g. PyTorch's CPU wheel index elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${OOMLENS_VENV:-.venv}"
requirements="${1:-requirements.txt}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec="${OOMLENS_TORCH:-torch>=2.4,<2.15}"
  else
    # A pinned release resolves to the CPU wheel where one is provided locally; elsewhere pass
    # OOMLENS_TORCH_INDEX so pip does not fetch several GB of CUDA libraries for a CPU machine.
    torch_spec="${OOMLENS_TORCH:-torch==2.13.0}"
  fi
  echo "setup: installing $torch_spec"
  if [ -n "${OOMLENS_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --extra-index-url "$OOMLENS_TORCH_INDEX" "$torch_spec"
  else
    "${pip[@]}" "$torch_spec"
  fi
fi

# Reinstall only when the requirement files change.
stamp="$venv/.oomlens-$(basename "$requirements").sha256"
digest=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  echo "setup: installing $requirements"
  "${pip[@]}" -r "$requirements"
  echo "$digest" > "$stamp"
fi
