"""The Diagnose page: real pasted messages, real snapshots, a hostile pickle, and garbage, as a user gives them."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import yaml

from app import nav
from app.views.oom_message import EXAMPLE, printed
from diagnosis.oom_text import parse_oom_messages
from diagnosis.snapshot import read_snapshot
from diagnosis.suggest import Evidence, suggest
from diagnosis.units import human_bytes
from tests.app.conftest import open_page, texts
from tests.diagnosis.test_snapshot import oom_snapshot
from trainer.config import validate_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MESSAGES = yaml.safe_load((FIXTURES / "oom_messages" / "messages.yaml").read_text(encoding="utf-8"))
BY_ID = {fixture["id"]: fixture for fixture in MESSAGES["messages"] + MESSAGES["not_oom"]}
LINEAR = FIXTURES / "snapshots" / "shreyansh26__MLSys-Experiments__16debf2b19__profile_grad.pkl"


def diagnose(text: str = ""):
    app = open_page(nav.DIAGNOSE)
    if text:
        app.text_area(key="diagnose.text").input(text).run()
    return app


def upload(app, name: str, content: bytes):
    app.file_uploader(key="diagnose.snapshot").upload(name, content).run()
    return app


def fix_titles(app) -> list[str]:
    return [element.value for element in app.markdown if element.value.startswith("**") and ". " in element.value]


def metrics(app) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def test_an_empty_page_says_what_to_paste_or_upload():
    app = diagnose()

    assert not app.exception
    assert "Paste the error from your log" in app.info[0].value
    assert "_dump_snapshot" in app.info[0].value
    assert not app.subheader  # nothing diagnosed yet


def test_a_real_message_shows_every_number_it_printed_and_the_processes():
    text = BY_ID["cuda21_pr99699_wrapped"]["text"]
    [parsed] = parse_oom_messages(text)

    app = diagnose(text)

    assert not app.exception
    shown = metrics(app)
    # Each figure as the message printed it, so a reader can check it against the text.
    assert shown["Requested"] == "138.00 MiB"
    assert shown["Total capacity"] == "15.90 GiB"
    assert shown["Free"] == "8.44 MiB"
    assert shown["Allocated by PyTorch"] == "14.12 GiB"
    assert shown["Reserved but unallocated"] == "410.41 MiB"
    assert shown["Reserved by PyTorch"] == printed(parsed.reserved_bytes) == "14.52 GiB"
    assert shown["Outside PyTorch (T − F − R)"] == printed(parsed.outside_pytorch_bytes) == "1.37 GiB"
    assert shown["This process (NVML)"] == "15.32 GiB"
    processes = app.dataframe[0].value
    assert list(processes["Process"]) == ["process 1246069", "this process (incl. non-PyTorch)"]
    assert list(processes["Memory in use"]) == ["577.00 MiB", "15.32 GiB"]
    # Its fixes are diagnosis.suggest's for the message alone, in its order.
    expected = suggest(Evidence(message=parsed))
    assert [title.split("**")[1] for title in fix_titles(app)] == [
        f"{rank}. {fix.category.replace('_', ' ')}" for rank, fix in enumerate(expected, start=1)
    ]


def test_the_classic_message_gets_the_arithmetic_and_fragmentation_first():
    app = open_page(nav.DIAGNOSE)
    app.button(key="diagnose.example").click().run()

    assert not app.exception
    assert app.text_area(key="diagnose.text").value == EXAMPLE
    shown = texts(app)
    # 39.59 − 28.77 − 3.20 = 7.62 GiB not in tensors; 5.73 GiB of it cached, 1.89 GiB outside PyTorch.
    assert "39.59 GiB total − 28.77 GiB allocated − 3.20 GiB free = **7.62 GiB**" in shown
    assert "34.50 GiB reserved − 28.77 GiB allocated = **5.73 GiB**" in shown
    assert "39.59 GiB total − 3.20 GiB free − 34.50 GiB reserved = **1.89 GiB** is outside PyTorch" in shown
    assert "Fragmentation: the allocator's cache held 5.7 GiB, more than the 3.9 GiB request" in shown
    assert metrics(app)["Requested"] == "3.90 GiB"
    assert metrics(app)["Where"] == "backward"
    assert fix_titles(app)[0].startswith("**1. alloc conf** · saves 5.7 GiB")
    assert "fits alone" in shown


def test_a_log_with_several_messages_lists_them_and_diagnoses_the_chosen_one():
    app = diagnose(BY_ID["xpu_ipex_three_messages"]["text"])

    assert not app.exception
    assert "**3 out-of-memory messages** in this text, in order:" in texts(app)
    table = app.dataframe[0].value
    assert list(table["Requested"]) == ["6.85 GiB", "1.71 GiB", "1.71 GiB"]
    assert metrics(app)["Allocated by PyTorch"] == "0 bytes"
    app.selectbox(key="diagnose.message_index").set_value(2).run()
    assert metrics(app)["Allocated by PyTorch"] == "176.00 MiB"
    assert "This layout does not print: free." in texts(app)


def test_text_that_is_not_an_oom_message_says_what_to_paste_instead():
    for fixture in ("embedding_index_error", "issue_title_prose", "cupy_oom_not_pytorch"):
        app = diagnose(BY_ID[fixture]["text"])

        assert not app.exception
        [warning] = app.warning
        assert warning.value.startswith("Not an OOM message")
        assert "Tried to allocate" in warning.value and "upload the pickle" in warning.value
        assert "Fixes, best first" not in [header.value for header in app.subheader]


def test_an_uploaded_snapshot_is_summarised_with_its_blocks_sites_and_timeline():
    summary = read_snapshot(LINEAR)

    app = upload(diagnose(), LINEAR.name, LINEAR.read_bytes())

    assert not app.exception
    assert app.info[0].value == summary.headline
    shown = metrics(app)
    assert shown["Reserved"] == human_bytes(summary.totals.reserved_bytes)
    assert shown["Allocated"] == human_bytes(summary.totals.allocated_bytes)
    sites, blocks = app.dataframe[0].value, app.dataframe[1].value
    assert len(blocks) == len(summary.largest_blocks)
    assert blocks["Size"].iloc[0] == human_bytes(summary.largest_blocks[0].size_bytes)
    assert sites["Code"].iloc[0] == summary.top_sites[0].label
    assert len(app.get("vega_lite_chart")) == 1  # one device with a traced timeline
    assert "No out-of-memory event in the trace." in texts(app)
    assert "Fixes, best first" in [header.value for header in app.subheader]


def test_a_gzip_snapshot_with_an_oom_event_lists_the_event():
    content = gzip.compress(pickle.dumps(oom_snapshot()))

    app = upload(diagnose(), "oom_snapshot.pickle.gz", content)

    assert not app.exception
    assert app.info[0].value.endswith("OOM at 64.0 MiB request")
    events = app.dataframe[-1].value
    assert list(events["Requested"]) == ["64.0 MiB"]
    assert list(events["Where"]) == ["/home/me/train.py:42 step"]


class _Hostile:
    """A pickle that runs a shell command when loaded by pickle.load: what a shared file can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for name, content in (
        ("snapshot.pickle", pickle.dumps(_Hostile(marker))),
        ("snapshot.pickle.gz", gzip.compress(pickle.dumps({"segments": [_Hostile(marker)]}))),
    ):
        app = upload(diagnose(), name, content)

        assert not app.exception
        [error] = app.error
        assert error.value.startswith(f"`{name}`: Refused, nothing from it was run")
        assert "system" in error.value
        assert not marker.exists()
        assert "Fixes, best first" not in [header.value for header in app.subheader]


def test_a_file_that_is_not_a_snapshot_says_what_to_upload():
    app = upload(diagnose(), "notes.txt", b"loss went down, then CUDA said no")

    assert not app.exception
    [error] = app.error
    assert error.value.startswith("`notes.txt`: Not a readable snapshot")
    assert "torch.cuda.memory._dump_snapshot" in error.value


def test_a_pasted_config_turns_savings_into_estimates_for_that_config():
    config = "model: {name: llama-2-7b, dtype: bf16, attn_implementation: eager}\nlora: {r: 8}\ndata: {seq_len: 4096}\n"
    text = BY_ID["cuda_new_this_process"]["text"]
    app = diagnose(text)
    app.radio(key="diagnose.config_kind").set_value("yaml").run()
    app.text_area(key="diagnose.config_yaml").input(config).run()

    assert not app.exception
    [message] = parse_oom_messages(text)
    expected = suggest(Evidence(validate_config(yaml.safe_load(config)), message))
    titles = fix_titles(app)
    assert len(titles) == len(expected)
    for title, fix in zip(titles, expected, strict=True):
        assert f"saves {human_bytes(fix.saves_bytes) if fix.saves_bytes is not None else '?'}" in title
    assert any(fix.category == "efficient_attention" and fix.saves_bytes for fix in expected)
    assert [block.value for block in app.code][-len(expected) :] == [fix.change for fix in expected]


def test_a_broken_config_is_a_message_and_fixes_still_come_from_the_message():
    app = diagnose(EXAMPLE)
    app.radio(key="diagnose.config_kind").set_value("yaml").run()
    app.text_area(key="diagnose.config_yaml").input("model: [unclosed").run()
    assert app.error[0].value.startswith("Not valid YAML")

    app.text_area(key="diagnose.config_yaml").input("data: {seq_len: 0}\ntrain: {optimizer: lion}").run()

    assert not app.exception
    errors = [element.value for element in app.error]
    assert any(error.startswith("`data.seq_len`:") for error in errors)
    assert any(error.startswith("`train.optimizer`:") for error in errors)
    assert fix_titles(app)[0].startswith("**1. alloc conf**")


def test_a_run_described_by_preset_and_knobs_is_estimated():
    app = diagnose(EXAMPLE)
    app.radio(key="diagnose.config_kind").set_value("knobs").run()
    app.selectbox(key="diagnose.model.name").set_value("llama-2-7b").run()
    app.selectbox(key="diagnose.model.attn_implementation").set_value("eager").run()

    assert not app.exception
    assert not app.error
    assert any("efficient attention" in title for title in fix_titles(app))


def test_a_pasted_message_with_its_config_says_what_the_failed_request_was():
    """The OOM recorded on the H100 (tests/fixtures/gpu), pasted with the config it ran."""
    import json

    recorded = json.loads((FIXTURES / "gpu" / "torch-2.11.0-cu130-NVIDIA-H100-80GB-HBM3" / "oom.json").read_text())
    app = diagnose(recorded["error_text"])
    assert not [m for m in app.markdown if m.value.startswith("**What it asked for:**")]  # no config: no name
    app.radio(key="diagnose.config_kind").set_value("yaml").run()
    app.text_area(key="diagnose.config_yaml").input(yaml.safe_dump(recorded["config"])).run()

    assert not app.exception
    (named,) = [m.value for m in app.markdown if m.value.startswith("**What it asked for:**")]
    assert "The failed 512.0 MiB request is 2 × 4 × 4,096 × 4,096 × 4 B" in named
