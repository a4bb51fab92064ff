"""Exit codes of `python -m trainer run`, part of the CLI contract the dashboard relies on."""

COMPLETED = 0
FAILED = 1
INVALID_CONFIG = 2
OUT_OF_MEMORY = 3
STOPPED = 143  # 128 + SIGTERM, as a shell would report it
