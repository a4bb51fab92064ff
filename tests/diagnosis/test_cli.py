"""`python -m diagnosis` as other tools call it: a real subprocess, JSON on stdout, exit codes."""

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, subprocess_env

MESSAGES = {
    m["id"]: m["text"]
    for m in yaml.safe_load((REPO / "tests" / "fixtures" / "oom_messages" / "messages.yaml").read_text())["messages"]
}
CONTRACT_KEYS = {
    "is_oom",
    "device",
    "requested_bytes",
    "total_bytes",
    "free_bytes",
    "allocated_bytes",
    "reserved_bytes",
    "reserved_unallocated_bytes",
    "process_bytes",
}


def diagnosis(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diagnosis", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=120,
    )


def test_parse_reads_stdin_and_answers_the_contract():
    result = diagnosis("parse", "-", "--json", stdin=MESSAGES["cuda_new_four_processes"])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert CONTRACT_KEYS <= set(data) and data["is_oom"] is True and data["device"] == 0
    assert data["requested_bytes"] == round(2.11 * 1024**3)
    assert [p["pid"] for p in data["process_bytes"]] == [19066, 19069, 19060, 19063]
    assert "messages" not in data


def test_parse_with_several_messages_gives_the_first_and_all(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(MESSAGES["xpu_ipex_three_messages"])
    data = json.loads(diagnosis("parse", str(log), "--json").stdout)
    assert (
        data["is_oom"]
        and len(data["messages"]) == 3
        and data["messages"][0] == {k: v for k, v in data.items() if k != "messages"}
    )


def test_garbage_is_not_an_oom_message_and_not_an_error():
    result = diagnosis("parse", "--json", stdin="\x00\x01 just a log line\n" * 50)
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["is_oom"] is False and set(data) >= CONTRACT_KEYS and data["process_bytes"] == []
    assert diagnosis("parse", stdin="hello").stdout.strip() == "not an OOM message"


def test_a_missing_file_is_a_clear_error():
    result = diagnosis("parse", "/nonexistent/log.txt")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_suggest_on_a_pasted_message():
    result = diagnosis("suggest", "-", "--json", stdin=MESSAGES["cuda21_zero_free_no_nvml"])
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)["suggestions"]
    assert items[0]["category"] == "alloc_conf" and "expandable_segments:True" in items[0]["change"]
    assert {"category", "change", "saves_bytes", "confidence", "why"} <= set(items[0])


def test_suggest_names_the_failed_request_of_the_recorded_h100_oom(tmp_path):
    """The real fraction-capped OOM recorded on the H100, pasted with its config."""
    recorded = json.loads(
        (REPO / "tests" / "fixtures" / "gpu" / "torch-2.11.0-cu130-NVIDIA-H100-80GB-HBM3" / "oom.json").read_text()
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(recorded["config"]))
    result = diagnosis("suggest", "-", "--config", str(config), "--json", stdin=recorded["error_text"])
    assert result.returncode == 0, result.stderr
    (request,) = json.loads(result.stdout)["failed_request"]
    assert request["location"] == "attention" and request["dims"] == {"batch": 2, "heads": 4, "tokens": 4096}
    text = diagnosis("suggest", "-", "--config", str(config), stdin=recorded["error_text"]).stdout
    assert text.startswith("The failed 512.0 MiB request is 2 × 4 × 4,096 × 4,096 × 4 B")


def test_snapshot_summary_and_refusal_of_code(tmp_path):
    snapshot = REPO / "tests" / "fixtures" / "snapshots"
    first = sorted(snapshot.glob("*.pickle*"))[0]
    result = diagnosis("snapshot", str(first), "--json")
    assert result.returncode == 0, result.stderr
    assert "headline" in json.loads(result.stdout)

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pickle.gz"
    evil.write_bytes(gzip.compress(pickle.dumps({"segments": [Evil()]})))
    result = diagnosis("snapshot", str(evil), "--json")
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_snapshot_text_shows_a_person_the_oom_where_it_was_asked_for_and_who_holds_the_bytes():
    """Without --json the summary is still the whole summary, not its headline alone (a real OOM
    snapshot recorded on an H100: eager attention asked for 512 MiB)."""
    recorded = (
        REPO / "tests" / "fixtures" / "gpu" / "torch-2.11.0-cu130-NVIDIA-H100-80GB-HBM3" / "oom_snapshot.pickle.gz"
    )
    summary = json.loads(diagnosis("snapshot", str(recorded), "--json").stdout)
    result = diagnosis("snapshot", str(recorded))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(summary["headline"])
    assert "out of memory on device 0: asked for 512.0 MiB with 213.0 MiB allocated and 220.0 MiB reserved" in text
    assert "at eager_attention_forward (transformers/models/llama/modeling_llama.py:204)" in text
    assert f"147.0 MiB      16 block(s)  {summary['top_sites'][0]['label']}" in text
    assert "largest blocks:" in text and "128.0 MiB  active_allocated, large pool" in text
    assert "peak reserved 222.0 MiB" in text  # the trace's peak, above the 220.0 MiB held at the dump


@pytest.mark.parametrize("args", [["estimate", "--set", "train.micro_batch_size=0"], ["estimate", "--gpu", "Z9000"]])
def test_estimate_refuses_bad_input_with_the_key_named(args):
    result = diagnosis(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "micro_batch_size" in result.stderr or "Z9000" in result.stderr


def test_an_analytic_estimate_in_words_says_how_far_to_trust_it():
    from diagnosis.accuracy import measured_error, trust_text

    result = diagnosis("estimate", "--set", "model.name=llama-3-8b", "--gpu", "A100-80GB")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"accuracy: {trust_text(measured_error())}")


def test_the_first_micro_batch_is_estimated_before_the_optimizer_states_exist():
    """A full fine-tune's AdamW states appear at the first optimizer.step(): the first forward and
    backward run without them, so step 1 can fit where step 2 does not."""
    full = ["--set", "model.name=llama-3.2-1b", "--set", "lora=null", "--set", "model.dtype=bf16"]
    full += ["--set", "data.seq_len=4096", "--set", "train.micro_batch_size=2", "--json"]
    steady = json.loads(diagnosis("estimate", *full).stdout)
    result = diagnosis("estimate", *full, "--first-micro-batch")
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout)
    assert first["breakdown"]["optimizer_states"] == 0 < steady["breakdown"]["optimizer_states"]
    assert first["peak_allocated_bytes"] == steady["peak_allocated_bytes"] - steady["breakdown"]["optimizer_states"]
    words = diagnosis("estimate", "--set", "model.name=llama-3.2-1b", "--first-micro-batch")
    assert "(analytic, first micro-batch, at " in words.stdout
    traced = diagnosis("estimate", "--set", "model.name=tiny-llama", "--traced", "--first-micro-batch")
    assert traced.returncode == 2 and "analytic only" in traced.stderr and "Traceback" not in traced.stderr


def test_fit_answers_in_words_and_in_json():
    llama_3_8b = ("--set", "model.name=llama-3-8b", "--set", "model.dtype=bf16", "--gpu", "RTX-4090")
    fits = diagnosis("fit", *llama_3_8b)
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.startswith("Largest data.seq_len that fits in 23.6 GiB: ")
    data = json.loads(diagnosis("fit", *llama_3_8b, "--json").stdout)
    assert data["knob"] == "data.seq_len" and 0 < data["value"] < data["limit"] and data["estimate"]["fits"]
    nothing = diagnosis("fit", "--set", "model.name=llama-3-70b", "--gpu", "T4", "--knob", "train.micro_batch_size")
    assert nothing.returncode == 0
    assert nothing.stdout.startswith("Nothing fits in 14.8 GiB: even train.micro_batch_size=1")


def test_estimate_and_suggest_follow_the_named_bitsandbytes():
    qlora = ["--set", "model.name=llama-2-7b", "--set", "model.dtype=bf16", "--set", "model.quantization=nf4"]
    peaks = {}
    for version in ("0.42.0", "0.43.2"):
        result = diagnosis("estimate", *qlora, "--bitsandbytes-version", version, "--json")
        assert result.returncode == 0, result.stderr
        peaks[version] = json.loads(result.stdout)["peak_allocated_bytes"]
    assert peaks["0.42.0"] > peaks["0.43.2"]
    result = diagnosis("suggest", *qlora, "--bitsandbytes-version", "0.42.0", "--json")
    assert result.returncode == 0, result.stderr
    changes = [item["change"] for item in json.loads(result.stdout)["suggestions"]]
    assert "pip install 'bitsandbytes>=0.43.2'" in changes
