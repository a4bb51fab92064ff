"""The OOM message parser against real messages of every era and device, and against what logs do to them.

Expected numbers are computed here from the printed value and unit, round(value * unit), with a unit
table of our own, so a wrong unit or a mis-assigned field in the parser cannot agree with itself.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diagnosis.oom_text import (
    LOCATIONS,
    MAX_PLAUSIBLE_BYTES,
    NOT_OOM_JSON,
    OomMessage,
    not_oom_json,
    parse_oom,
    parse_oom_messages,
    requested_bytes,
)

FIXTURES = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "fixtures" / "oom_messages" / "messages.yaml").read_text(encoding="utf-8")
)
MESSAGES = {fixture["id"]: fixture for fixture in FIXTURES["messages"]}
UNIT = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 2**10, "MB": 2**20, "GB": 2**30}
# fixture key -> OomMessage attribute
FIELDS = {
    "requested": "requested_bytes",
    "total": "total_bytes",
    "free": "free_bytes",
    "allocated": "allocated_bytes",
    "reserved": "reserved_bytes",
    "unallocated": "reserved_unallocated_bytes",
    "allowed": "allowed_bytes",
    "private_pool": "private_pool_bytes",
    "this_process": "this_process_bytes",
    "other": "other_allocations_bytes",
    "outside": "outside_pytorch_bytes",
}
PLAIN = ("backend", "era", "device", "rank", "location", "frame")
NUMBERS = (*FIELDS.values(), "device", "backend", "era")


def printed(size: str) -> int:
    """Bytes of a size as the message printed it ("577.00 MiB", "0 bytes"); a leading "-" subtracts it."""
    sign = -1 if size.startswith("-") else 1
    value, unit = size.lstrip("-").split()
    return sign * round(float(value) * UNIT[unit])


def expected_bytes(spec: str | list[str] | None) -> int | None:
    if spec is None:
        return None
    return sum(printed(part) for part in spec) if isinstance(spec, list) else printed(spec)


def check(message: OomMessage, expect: dict) -> None:
    for key, attribute in FIELDS.items():
        if key in expect:
            assert getattr(message, attribute) == expected_bytes(expect[key]), key
    for key in PLAIN:
        if key in expect:
            assert getattr(message, key) == expect[key], key
    if "processes" in expect:
        got = [(p.pid, p.bytes) for p in message.process_bytes]
        assert got == [(pid, expected_bytes(size)) for pid, size in expect["processes"]]


def numbers(messages: list[OomMessage]) -> list[tuple]:
    return [(*(getattr(m, name) for name in NUMBERS), m.process_bytes) for m in messages]


# --------------------------------------------------------------------------- real messages


@pytest.mark.parametrize("fixture", FIXTURES["messages"], ids=lambda f: f["id"])
def test_real_message_reads_back_every_printed_number(fixture):
    messages = parse_oom_messages(fixture["text"])
    assert len(messages) == len(fixture["expect"])
    for message, expect in zip(messages, fixture["expect"], strict=True):
        check(message, expect)


@pytest.mark.parametrize("fixture", FIXTURES["not_oom"], ids=lambda f: f["id"])
def test_real_non_oom_text_is_not_an_oom(fixture):
    assert parse_oom_messages(fixture["text"]) == []
    assert parse_oom(fixture["text"]) is None
    assert requested_bytes(fixture["text"]) is None


def test_every_era_and_device_has_a_real_example():
    eras = {m.era for fixture in FIXTURES["messages"] for m in parse_oom_messages(fixture["text"])}
    assert eras >= {
        "cuda<=1.3 cached",
        "cuda<=2.0",
        "cuda 2.1",
        "cuda>=2.1",
        "cuda mallocasync",
        "cuda error",
        "hip>=2.1",
        "xpu>=2.1",
        "xpu<=2.0",
        "mps",
        "cpu",
        "python",
    }


def test_every_fixture_names_its_source():
    for fixture in FIXTURES["messages"] + FIXTURES["not_oom"]:
        assert fixture["source"].startswith("https://github.com/"), fixture["id"]


def test_cached_era_reads_cached_as_the_unused_part_of_the_cache():
    # THCCachingAllocator printed amount_cached - amount_allocated as "cached" (pytorch#13751), so
    # reserved is X + C there, while from 1.4 "R reserved in total" is already the total.
    cached = parse_oom(MESSAGES["cuda_cached_pr13751"]["text"])
    assert cached.reserved_unallocated_bytes == printed("179.00 KiB")
    assert cached.reserved_bytes == printed("4.00 GiB") + printed("179.00 KiB")
    total = parse_oom(MESSAGES["cuda_reserved_no_hint"]["text"])
    assert total.reserved_bytes == printed("30.70 GiB")


def test_derived_figures_say_what_the_allocator_does_not_hold():
    message = parse_oom(MESSAGES["cuda_reserved_gpu1"]["text"])  # T 7.79, X 3.53, F 1.40, R 5.28 GiB
    assert message.reserved_unallocated_bytes == printed("5.28 GiB") - printed("3.53 GiB")
    assert message.outside_pytorch_bytes == printed("7.79 GiB") - printed("1.40 GiB") - printed("5.28 GiB")
    assert message.not_in_tensors_bytes == printed("7.79 GiB") - printed("3.53 GiB") - printed("1.40 GiB")
    mps = parse_oom(MESSAGES["mps_gib_units"]["text"])
    assert mps.outside_pytorch_bytes == printed("17.35 GiB") and mps.not_in_tensors_bytes is None


def test_sentinel_sizes_become_none_and_every_value_fits_a_bigint_column():
    assert MAX_PLAUSIBLE_BYTES < 2**63
    absurd = parse_oom(MESSAGES["cuda_new_nvml_absurd"]["text"])
    assert absurd.this_process_bytes is None and absurd.process_bytes[0].bytes is None
    assert parse_oom(MESSAGES["cuda_malloc_async"]["text"]).allowed_bytes is None
    for fixture in FIXTURES["messages"]:
        for message in parse_oom_messages(fixture["text"]):
            for value in (getattr(message, name) for name in FIELDS.values()):
                assert value is None or 0 <= value <= MAX_PLAUSIBLE_BYTES


def test_requested_bytes_keeps_its_contract_for_the_trainer():
    assert requested_bytes(MESSAGES["cpu_posix"]["text"]) == 116813856768
    assert requested_bytes(MESSAGES["cuda21_pr99699_wrapped"]["text"]) == printed("138.00 MiB")
    assert requested_bytes("HIP out of memory. Tried to allocate 512 bytes") == 512
    assert requested_bytes("something else entirely") is None


# --------------------------------------------------------------------------- the JSON contract


def test_to_json_has_the_cli_contract_and_serialises():
    message = parse_oom(MESSAGES["cuda_new_process_and_self"]["text"])
    data = message.to_json()
    assert set(NOT_OOM_JSON) <= set(data)
    assert data["is_oom"] is True and data["device"] == 0
    assert data["process_bytes"] == [
        {"pid": 4078482, "bytes": printed("11.29 GiB")},
        {"pid": None, "bytes": printed("9.25 GiB")},
    ]
    assert json.loads(json.dumps(data)) == data
    assert parse_oom(MESSAGES["cpu_posix"]["text"]).to_json()["device"] == "cpu"


def test_not_oom_json_is_the_contract_with_every_value_empty():
    data = not_oom_json()
    assert data == {
        "is_oom": False,
        "device": None,
        "requested_bytes": None,
        "total_bytes": None,
        "free_bytes": None,
        "allocated_bytes": None,
        "reserved_bytes": None,
        "reserved_unallocated_bytes": None,
        "process_bytes": [],
    }
    data["process_bytes"].append(1)
    assert not_oom_json()["process_bytes"] == []
    assert json.dumps(not_oom_json())


# --------------------------------------------------------------------------- what logs do to messages


def test_text_rewrapped_inside_numbers_and_words_reads_the_same():
    original = MESSAGES["cuda21_absurd_request"]["text"]
    wrapped = original.replace("39.59 GiB", "39.5\n9 GiB").replace("to allocate", "to\nallocate")
    wrapped = wrapped.replace("5.42 GiB", "5.42  \n   GiB").replace("Process 75498", "Proc\r\ness 754\t98")
    assert numbers(parse_oom_messages(wrapped)) == numbers(parse_oom_messages(original))
    assert parse_oom(wrapped).total_bytes == printed("39.59 GiB")


def test_dropped_parentheses_read_the_same():
    original = MESSAGES["cuda_reserved_gpu1"]["text"]
    assert numbers(parse_oom_messages(original.replace("(", "").replace(")", ""))) == numbers(
        parse_oom_messages(original)
    )


def test_every_wrapped_line_prefixed_by_a_logger_reads_the_same():
    original = MESSAGES["cuda21_pr99699_wrapped"]["text"]
    for prefix in ("[rank3]: ", "2024-05-01 12:00:01,123 ERROR ", "(EngineCore pid=104) ", "> "):
        prefixed = "\n".join(prefix + line for line in original.splitlines())
        assert numbers(parse_oom_messages(prefixed)) == numbers(parse_oom_messages(original)), prefix
    assert parse_oom("\n".join("[rank3]: " + line for line in original.splitlines())).rank == 3


def test_two_ranks_interleaved_within_one_line_are_read_apart():
    a, b = MESSAGES["cuda_new_four_processes"]["text"], MESSAGES["cuda_new_this_process"]["text"]
    cut_a, cut_b = a.index("Process 19060"), b.index("Of the allocated")
    log = f"[rank1]: {a[:cut_a]}[rank0]: {b[:cut_b]}\n[rank1]: {a[cut_a:]}\n[rank0]: {b[cut_b:]}\n"
    first, second = parse_oom_messages(log)
    assert (first.rank, second.rank) == (1, 0)
    assert numbers([first]) == numbers(parse_oom_messages(a))
    assert numbers([second]) == numbers(parse_oom_messages(b))


def test_several_messages_in_one_log_come_back_in_order():
    ids = ["cuda_cached_16417", "mps_gib_units", "cpu_posix", "cuda_new_four_processes", "hip_new", "xpu_new"]
    log = "\n".join(f"step {i}: loss 1.23\n{MESSAGES[name]['text']}\n" for i, name in enumerate(ids))
    expected = [m for name in ids for m in parse_oom_messages(MESSAGES[name]["text"])]
    assert numbers(parse_oom_messages(log)) == numbers(expected)


def test_a_message_ends_where_its_words_end():
    # The hint after a message and the next log lines are not part of it (and never read for numbers).
    message = parse_oom(MESSAGES["cuda_new_this_process"]["text"] + "\nProcess 1 has 99.00 GiB memory in use.")
    assert [p.pid for p in message.process_bytes] == [None]
    assert message.text.endswith("is reserved by PyTorch but unallocated.")


# --------------------------------------------------------------------------- where it failed

# The fixture's `frames` (real where a paste had frames but lost its message, else constructed from one
# library source line) each get a real message appended.
OOM_LINE = "torch.OutOfMemoryError: " + MESSAGES["cuda_new_this_process"]["text"].removeprefix(
    "torch.cuda.OutOfMemoryError: "
)
FRAMES = {case["location"]: case for case in FIXTURES["frames"]}


@pytest.mark.parametrize("case", FIXTURES["frames"], ids=lambda case: case["location"])
def test_location_and_frame_from_the_traceback_above_the_message(case):
    message = parse_oom(case["text"] + "\n" + OOM_LINE)
    assert (message.location, message.frame) == (case["location"], case["frame"])
    assert message.requested_bytes == printed("22.00 MiB")


def test_every_location_has_a_case():
    real = {e.get("location") for f in FIXTURES["messages"] for e in f["expect"]}
    assert set(LOCATIONS) <= real | set(FRAMES)


def test_the_innermost_frame_that_says_anything_decides():
    # an attention OOM during evaluation is an attention OOM; the eval loop frame is further out
    traceback = FRAMES["evaluation"]["text"] + "\n" + FRAMES["attention"]["text"] + "\n"
    assert parse_oom(traceback + OOM_LINE).location == "attention"


def test_only_the_last_traceback_before_a_message_counts():
    earlier = FRAMES["checkpoint_save"]["text"] + "\nValueError: unrelated\n\n"
    assert parse_oom(earlier + "Traceback (most recent call last):\n" + OOM_LINE).location is None


# --------------------------------------------------------------------------- garbage and cost


@pytest.mark.parametrize("text", ["", " \n\t", "\x00\xff" * 50, "Tried to allocate", "MemoryError handler", "[rank1]:"])
def test_garbage_is_not_an_oom(text):
    assert parse_oom_messages(text) == []


def test_non_text_is_not_an_oom():
    assert parse_oom_messages(None) == []  # type: ignore[arg-type]
    assert parse_oom_messages(b"CUDA out of memory. Tried to allocate 2 GiB") == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda rng: "".join(rng.choices("CUDA out of memory. Tried 9.5GiB\n[rank1]:();>", k=1_000_000)),
        lambda rng: "Tried to allocate " + "9" * 1_000_000,
        lambda rng: "[rank1]: CUDA out of memory. Tried to allocate 1 GiB\n" * 10_000,
        lambda rng: ('File "' + "a" * 300 + '", line 1, in f\n') * 3_000 + OOM_LINE,
    ],
    ids=["random", "digits", "same_rank_repeated", "long_traceback"],
)
def test_a_megabyte_costs_linear_time(build):
    # Quadratic work on these inputs takes minutes; linear takes well under a second.
    text = build(random.Random(0))
    started = time.perf_counter()
    parse_oom_messages(text)
    assert time.perf_counter() - started < 5


FUZZABLE = [f for f in FIXTURES["messages"] if f["expect"][0].get("backend") != "python"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000))
def test_random_text_never_raises(text):
    for message in parse_oom_messages(text):
        assert message.to_json()["is_oom"] is True


@settings(max_examples=200, deadline=None)
@given(
    fixture=st.sampled_from(FUZZABLE),
    insertions=st.lists(st.tuples(st.floats(0, 1), st.sampled_from([" ", "\n", "\t", "\r\n", "  \n   "])), max_size=12),
)
def test_whitespace_inserted_anywhere_keeps_every_number(fixture, insertions):
    text = fixture["text"]
    for where, space in sorted(insertions, reverse=True):
        at = int(where * len(text))
        text = text[:at] + space + text[at:]
    assert numbers(parse_oom_messages(text)) == numbers(parse_oom_messages(fixture["text"]))


@settings(max_examples=200, deadline=None)
@given(fixture=st.sampled_from(FIXTURES["messages"]), cut=st.floats(0, 1))
def test_a_truncated_message_reads_a_subset_of_its_numbers(fixture, cut):
    # What survives a cut is right or absent: a half-printed "16.0" never reads as 16 bytes.
    full = parse_oom_messages(fixture["text"])
    short = parse_oom_messages(fixture["text"][: int(cut * len(fixture["text"]))])
    assert len(short) <= len(full)
    for truncated, whole in zip(short, full, strict=False):
        for name in (*FIELDS.values(), "device"):
            assert getattr(truncated, name) in (None, getattr(whole, name)), name


def test_messages_are_frozen():
    message = parse_oom(MESSAGES["hip_new"]["text"])
    with pytest.raises(AttributeError, match="cannot assign"):
        message.requested_bytes = 1  # type: ignore[misc]
    assert re.fullmatch(r"HIP out of memory\. Tried to allocate 432\.00 MiB\. .*unallocated\.", message.text)
