"""Which library versions change an estimate, read from versions and requirements alike."""

import pytest

from diagnosis.libraries import LATEST, bitsandbytes_keeps_matmul_input, parse_version


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0.43.3", (0, 43, 3)), (">=0.43.0", (0, 43, 0)), ("0.42.0.dev1", (0, 42, 0)), (LATEST, None), (None, None)],
)
def test_versions_and_requirements_give_their_release_numbers(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    ("version", "keeps"),
    [("0.41.1", True), ("0.42.0", True), ("0.43.1", True), ("0.43.2", False), ("0.45.0", False), (None, False)],
)
def test_bitsandbytes_kept_4bit_inputs_until_0_43_2(version, keeps):
    assert bitsandbytes_keeps_matmul_input(version) is keeps
