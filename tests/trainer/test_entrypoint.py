"""Both command lines end with their command's exit code, and quietly when the reader of their output
leaves first (`python -m trainer show latest | head`)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB"


@pytest.mark.parametrize(
    ("module", "args", "stdin"),
    [
        ("trainer", ["validate", "--config", str(REPO / "examples" / "tiny-llama-lora.yaml")], ""),
        ("diagnosis", ["parse", "-", "--json"], OOM),
    ],
)
def test_a_reader_that_leaves_early_is_not_a_failure(module, args, stdin):
    child = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        cwd=REPO,
    )
    child.stdout.close()  # the reader is gone before the command writes a byte
    _, err = child.communicate(stdin.encode(), timeout=120)
    assert child.returncode == 0, err.decode()[-2000:]
    assert b"BrokenPipeError" not in err and b"Traceback" not in err


def test_the_commands_exit_code_comes_through():
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "validate", "--config", "/nonexistent.yaml"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 2 and "nonexistent" in done.stderr
