#!/usr/bin/env bash
# Run HERE (the development machine, with network to PyPI), before a GPU check: downloads into .whl/
# the wheels the lent GPU machine lacks. Its image has torch, transformers, peft, accelerate, psutil,
# PyYAML, nvidia-ml-py, pandas and pytest, for Python 3.12, and no network; it has no SQLAlchemy,
# alembic or pydantic. The versions are the ones this checkout's .venv runs, so both machines test
# the same code. .whl/ is ignored through .git/info/exclude, never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
mapfile -t pins < <("$PYTHON" - <<'PY'
from importlib.metadata import version
for name in ("SQLAlchemy", "alembic", "Mako", "MarkupSafe", "pydantic", "pydantic_core",
             "annotated-types", "typing-inspection", "typing_extensions"):
    print(f"{name}=={version(name)}")
PY
)
for pin in "${pins[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
ls -1 .whl
du -sh .whl
