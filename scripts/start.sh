#!/usr/bin/env bash
# Sets up and starts the oomlens dashboard at http://127.0.0.1:8501 (this machine only).
#   OOMLENS_PORT     the port (default 8501)
#   OOMLENS_ADDRESS  the address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network,
#                    with no login in front of it)
#   OOMLENS_DB_URL / OOMLENS_WORKSPACE  which database it shows (default ~/.oomlens/oomlens.db)
# Extra arguments go to `streamlit run`, e.g. --server.baseUrlPath oomlens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${OOMLENS_VENV:-.venv}"
# No file watcher (nobody edits the app while using it this way) and no usage statistics sent out.
exec "$venv/bin/python" -m streamlit run app/main.py \
  --server.address "${OOMLENS_ADDRESS:-127.0.0.1}" \
  --server.port "${OOMLENS_PORT:-8501}" \
  --server.headless true \
  --server.fileWatcherType none \
  --browser.gatherUsageStats false \
  "$@"
