"""How `python -m trainer` and `python -m diagnosis` end: with their command's exit code, and quietly
when whoever reads the output leaves early (`python -m trainer show latest | head`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left; that is not a failure of ours. Later writes (at exit) go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
