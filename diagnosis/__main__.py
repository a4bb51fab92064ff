import os
import sys

from diagnosis.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:
    # `python -m diagnosis parse log | head`: the reader left; that is not a failure of ours.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 0
sys.exit(code)
