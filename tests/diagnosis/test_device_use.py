"""The card at a failure in words: this process's share and the rest, or why there is no reading."""

from diagnosis.device_use import device_use_at_failure
from diagnosis.units import GIB


def test_the_rest_of_the_card_is_named_as_others():
    use = device_use_at_failure(
        {"available": True, "taken": "at the failing allocation", "memory_used_bytes": 79 * GIB,
         "memory_total_bytes": 80 * GIB, "process_used_bytes": 71 * GIB}
    )  # fmt: skip
    assert use.available and use.taken == "at the failing allocation"
    assert use.text == (
        "79.0 GiB of 80.0 GiB in use, 71.0 GiB by this process, 8.0 GiB by others (other processes, or the driver)"
    )


def test_a_reading_without_this_process_says_only_what_it_has():
    # NVML lists per-process use only where the driver allows it (not inside some containers).
    use = device_use_at_failure({"available": True, "memory_used_bytes": 10 * GIB, "memory_total_bytes": 80 * GIB})
    assert use.text == "10.0 GiB of 80.0 GiB in use" and use.taken == "taken"


def test_no_reading_gives_the_reason_and_no_field_gives_nothing():
    use = device_use_at_failure({"available": False, "reason": "the run is on the CPU"})
    assert not use.available and use.text == "the run is on the CPU"
    assert device_use_at_failure({"available": False}).text == "not recorded"
    assert device_use_at_failure(None) is None and device_use_at_failure({}) is None
