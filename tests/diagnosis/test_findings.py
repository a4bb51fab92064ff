from diagnosis.findings import explain_failure, memory_trend
from diagnosis.oom_text import requested_bytes

MIB = 1024**2


def steps(n, seq_len=512, rss=lambda i: 500 * MIB, retries=lambda i: None):
    return [
        {"step": i, "seq_len": seq_len, "rss_bytes": rss(i), "allocated_bytes": None, "num_alloc_retries": retries(i)}
        for i in range(1, n + 1)
    ]


def test_long_batch_is_named_with_its_ratio():
    finding = explain_failure(11, 4096, steps(10, seq_len=1024))
    assert finding.text.startswith("This batch was 4,096 tokens, 4.0x the median of 1,024 and the longest so far")
    assert finding.details["seq_len_ratio"] == 4.0


def test_steady_growth_is_a_leak_and_noise_is_not():
    leak = memory_trend(steps(20, rss=lambda i: 500 * MIB + i * 4 * MIB))
    assert leak["bytes_per_step"] == 4 * MIB and leak["since_step"] == 1
    noisy = steps(20, rss=lambda i: 500 * MIB + (i % 2) * 40 * MIB)
    assert memory_trend(noisy) is None
    assert memory_trend(steps(5, rss=lambda i: i * 100 * MIB)) is None  # too short to call


def test_cuda_runs_use_allocated_bytes_for_the_trend():
    history = [{"step": i, "seq_len": 8, "allocated_bytes": i * 64 * MIB, "rss_bytes": 1} for i in range(1, 12)]
    assert memory_trend(history)["metric"] == "allocated_bytes"


def test_alloc_retries_before_the_failure_are_reported():
    finding = explain_failure(10, 512, steps(9, retries=lambda i: max(0, i - 6)))
    assert "retried 3 time(s)" in finding.text


def test_first_step_and_typical_failures_say_so():
    assert "first step" in explain_failure(1, 512, []).text
    assert "steady over 9 steps" in explain_failure(10, 512, steps(9)).text


def test_requested_bytes_from_each_form():
    cpu = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 536870912 bytes. Error code 12"
    assert requested_bytes(cpu) == 536870912
    old = "CUDA out of memory. Tried to allocate 3.90 GiB (GPU 0; 39.59 GiB total capacity; 28.77 GiB already"
    assert requested_bytes(old) == round(3.90 * 1024**3)
    new = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.10 GiB of which"
    assert requested_bytes(new) == 20 * MIB
    assert requested_bytes("HIP out of memory. Tried to allocate 512 bytes") == 512
    assert requested_bytes("something else entirely") is None
