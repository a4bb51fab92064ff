import functools
import gzip
import io
import json
import os
import pickle
import time
from pathlib import Path

import pytest

from diagnosis.safe_pickle import SnapshotFormatError, SnapshotTooLargeError, UnsafePickleError, load_path
from diagnosis.snapshot import (
    LAYOUT_BLOCK_HISTORY,
    LAYOUT_CURRENT,
    LAYOUT_SEGMENT_LIST,
    LAYOUT_SEGMENTS_TRACES,
    TIMELINE_MAX_POINTS,
    downsample_indices,
    read_snapshot,
    summarize_snapshot,
    user_frame,
)

MIB = 1024**2
GIB = 1024**3
SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "snapshots"
LOCAL = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots"

# From the shared README's table (segments, trace entries per device), and the layout each shows.
FIXTURES = {
    "HugePandaCoder__octree-nca-groupeq__3e8aa21ab5__cuda_single_step.pickle": (LAYOUT_CURRENT, 2, [5]),
    "JasperSolt__EoR_NN__10cd0b497a__snapshot.pickle": (LAYOUT_SEGMENTS_TRACES, 10, [5803]),
    "Maphsge4__select_n__1f2f548046__snapshot.pickle": (LAYOUT_SEGMENTS_TRACES, 82, [4496, 0, 0, 0]),
    "Muduard__LayoutEditing__e600157f38__memory_snapshot.pkl": (LAYOUT_SEGMENT_LIST, 255, None),
    "SunnySood80__unsupervised_finetune_resnet50__7c75eafd28__dump_snapshot.pickle": (LAYOUT_CURRENT, 0, [0] * 4),
    "Wedsonlin__assignment2-systems__87b086417e__medium_128_training_memory_snapshot.pickle": (
        LAYOUT_CURRENT,
        377,
        [19136],
    ),
    "Yiyi-philosophy__LLM-inference__61261a2e7d__1.3b_snapshot.pickle": (LAYOUT_BLOCK_HISTORY, 257, [1]),
    "albi2__thesis-text-to-SQL__50c7147dba__dump_snapshot.pickle": (LAYOUT_CURRENT, 3, [0, 0]),
    "kkaitlyn111__cs336-a2-systems__9aa5e31a12__memory_ctx128_fullstep.pickle": (LAYOUT_CURRENT, 1010, [19052]),
    "shreyansh26__MLSys-Experiments__16debf2b19__profile_grad.pkl": (LAYOUT_CURRENT, 7, [33]),
    "volcengine__verl__27ee9a4d77__mem.pickle": (LAYOUT_CURRENT, 127, [0]),
}
EMPTY, EXPANDABLE, LINEAR, SEGMENT_LIST, HISTORY = (
    "SunnySood80__unsupervised_finetune_resnet50__7c75eafd28__dump_snapshot.pickle",
    "albi2__thesis-text-to-SQL__50c7147dba__dump_snapshot.pickle",
    "shreyansh26__MLSys-Experiments__16debf2b19__profile_grad.pkl",
    "Muduard__LayoutEditing__e600157f38__memory_snapshot.pkl",
    "Yiyi-philosophy__LLM-inference__61261a2e7d__1.3b_snapshot.pickle",
)


def fixture(name: str) -> Path:
    """The repository's copy when there is one (clean clones, CI), else the shared set."""
    for path in (LOCAL / name, LOCAL / f"{name}.gz", SHARED / name):
        if path.exists():
            return path  # a .gz copy reads as the same pickle (diagnosis.safe_pickle sniffs gzip)
    pytest.skip(f"{name} is only in the shared fixture set, and {SHARED} is not here")


@functools.cache
def load(name: str):
    path = fixture(name)
    return load_path(path), summarize_snapshot(load_path(path))


def segments_of(raw):
    return raw if isinstance(raw, list) else raw["segments"]


def blocks_of(raw, state=None, device=None):
    return [
        b
        for s in segments_of(raw)
        if device is None or s["device"] == device
        for b in s["blocks"]
        if state is None or b["state"] == state
    ]


def replay(trace):
    """The trace's running totals at full resolution, counted here without the module's code."""
    allocated = reserved = 0
    allocated_series, reserved_series = [], []
    for event in trace:
        allocated += {"alloc": event["size"], "free_completed": -event["size"]}.get(event["action"], 0)
        reserved += {"segment_alloc": event["size"], "segment_free": -event["size"]}.get(event["action"], 0)
        allocated_series.append(allocated)
        reserved_series.append(reserved)
    return allocated_series, reserved_series


def test_the_shared_set_holds_exactly_the_fixtures_described_here():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here (a clone outside the team's workspace)")
    assert {p.name for p in SHARED.iterdir() if p.name != "README.md"} == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_summarises_to_totals_that_add_up(name):
    raw, summary = load(name)
    layout, segment_count, trace_lengths = FIXTURES[name]
    totals = summary.totals

    assert summary.layout == layout
    assert totals.segments == segment_count
    assert summary.device_count == (len(trace_lengths) if trace_lengths else 1)
    assert totals.reserved_bytes == sum(s["total_size"] for s in segments_of(raw))
    assert totals.allocated_bytes == sum(b["size"] for b in blocks_of(raw, "active_allocated"))
    assert totals.active_bytes == sum(b["size"] for b in blocks_of(raw) if b["state"] != "inactive")
    assert totals.allocated_bytes <= totals.active_bytes <= totals.reserved_bytes
    assert totals.split_free_bytes <= totals.free_bytes == totals.reserved_bytes - totals.active_bytes
    assert totals.largest_free_block_bytes == max((b["size"] for b in blocks_of(raw, "inactive")), default=0)
    assert totals.large_segments + totals.small_segments == totals.segments
    assert sum(d.totals.reserved_bytes for d in summary.devices) == totals.reserved_bytes
    assert json.loads(json.dumps(summary.to_json())) == summary.to_json()
    assert summary.headline


@pytest.mark.parametrize("name", sorted(n for n, facts in FIXTURES.items() if facts[2] and any(facts[2])))
def test_the_timeline_replays_the_trace_and_ends_at_the_snapshot(name):
    raw, summary = load(name)
    for device in summary.devices:
        trace = raw["device_traces"][device.device]
        timeline = device.timeline
        assert timeline.events == len(trace) == FIXTURES[name][2][device.device]
        assert len(timeline.x) <= TIMELINE_MAX_POINTS
        assert list(timeline.x) == sorted(timeline.x)
        in_use = blocks_of(raw, device=device.device)
        assert timeline.allocated_bytes[-1] == sum(b["requested_size"] for b in in_use if b["state"] != "inactive")
        assert timeline.reserved_bytes[-1] == device.totals.reserved_bytes
        allocated, reserved = replay(trace)
        assert max(timeline.allocated_bytes) == timeline.allocated_before_trace_bytes + max(allocated)
        assert max(timeline.reserved_bytes) == timeline.reserved_before_trace_bytes + max(reserved)


def test_an_empty_snapshot_reads_as_zeros_with_a_sentence_that_says_so():
    _, summary = load(EMPTY)
    assert summary.devices == () and summary.largest_blocks == () and summary.top_sites == ()
    assert all(value == 0 for value in vars(summary.totals).values())
    assert summary.headline == "Empty snapshot: the allocator held no memory"
    assert summary.allocator_settings["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True,max_split_size_mb:64"


def test_expandable_segments_count_no_split_slivers():
    _, summary = load(EXPANDABLE)
    assert summary.totals.expandable_segments == summary.totals.segments == 3
    assert summary.totals.split_free_bytes == 0
    assert [d.device for d in summary.devices] == [0, 1]
    assert summary.site_source is None  # recorded without stacks
    assert summary.headline == (
        "82.0 MiB reserved, 16.3 MiB allocated across 2 devices; 65.7 MiB cached free (expandable segments: "
        "no split slivers)"
    )


def test_a_trace_from_process_start_needs_no_anchor_and_names_the_2_gb_line():
    raw, summary = load(LINEAR)
    assert raw["device_traces"][0][0]["action"] == "segment_alloc"  # the buffer saw the first segment
    timeline = summary.devices[0].timeline
    assert (timeline.allocated_before_trace_bytes, timeline.reserved_before_trace_bytes) == (0, 0)
    assert timeline.x_unit == "time_us"

    biggest = summary.largest_blocks[0]
    assert (biggest.size_bytes, biggest.state) == (2_000_683_008, "active_allocated")  # a 10k x 50k fp32 weight
    assert (Path(biggest.user_frame.filename).name, biggest.user_frame.line) == ("profile_grad.py", 8)

    by_line = {}
    for block in blocks_of(raw, "active_allocated"):
        line = next(f["line"] for f in block["frames"] if f["filename"].endswith("profile_grad.py"))
        by_line[line] = by_line.get(line, 0) + block["size"]
    assert [(s.line, s.bytes) for s in summary.top_sites] == sorted(by_line.items(), key=lambda kv: -kv[1])
    assert (
        summary.headline == "4.1 GiB reserved, 3.0 GiB allocated; 3.1 MiB free inside split segments (<1% of reserved)"
    )


def test_the_legacy_segment_list_is_detected_and_attributed():
    raw, summary = load(SEGMENT_LIST)
    assert isinstance(raw, list) and summary.layout == LAYOUT_SEGMENT_LIST
    assert [(d.device, d.timeline) for d in summary.devices] == [(1, None)]
    site = summary.top_sites[0]
    assert (Path(site.filename).name, site.line, site.function) == ("attention_processor.py", 1262, "__call__")
    assert site.count == sum(
        1 for b in blocks_of(raw, "active_allocated") if b["frames"] and b["frames"][0]["line"] == 1262
    )
    assert summary.unattributed_bytes == sum(b["size"] for b in blocks_of(raw, "active_allocated") if not b["frames"])


def test_block_history_layout_gets_frames_from_history_and_addresses_from_sizes():
    raw, summary = load(HISTORY)
    assert summary.layout == LAYOUT_BLOCK_HISTORY
    biggest = summary.largest_blocks[0]
    home = next(s for s in raw["segments"] if any(b["size"] == biggest.size_bytes for b in s["blocks"]))
    assert biggest.address == home["address"]
    assert (Path(biggest.user_frame.filename).name, biggest.user_frame.name) == (
        "pytorch_backend.py",
        "opt_output_embed",
    )
    timeline = summary.devices[0].timeline
    assert timeline.x_unit == "event"  # no time_us in this era's trace
    assert timeline.allocated_before_trace_bytes - timeline.allocated_bytes[-1] == raw["device_traces"][0][0]["size"]


def test_pending_frees_count_as_active_not_allocated():
    raw, summary = load("volcengine__verl__27ee9a4d77__mem.pickle")
    pending = sum(b["size"] for b in blocks_of(raw, "active_pending_free"))
    assert pending > 0
    assert summary.totals.active_bytes - summary.totals.allocated_bytes == pending


def test_a_ring_buffer_that_starts_mid_run_is_anchored_to_the_segments():
    raw, summary = load("Wedsonlin__assignment2-systems__87b086417e__medium_128_training_memory_snapshot.pickle")
    assert not any(e["action"].startswith("segment") for e in raw["device_traces"][0])
    timeline = summary.devices[0].timeline
    assert set(timeline.reserved_bytes) == {summary.totals.reserved_bytes}
    assert timeline.allocated_before_trace_bytes > 4 * GIB


def test_the_biggest_fixture_summarises_in_seconds():
    path = fixture("kkaitlyn111__cs336-a2-systems__9aa5e31a12__memory_ctx128_fullstep.pickle")
    started = time.perf_counter()
    read_snapshot(path)
    assert time.perf_counter() - started < 10  # ~0.3 s here; generous for a loaded 2-core machine


# --- synthetic snapshots: what no recorded fixture shows (an OOM), in the current layout ------

TORCH_FRAMES = [
    {"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
    {"filename": "CUDACachingAllocator.cpp", "line": 0, "name": "c10::cuda::CUDACachingAllocator::malloc"},
    {"filename": "/env/lib/python3.11/site-packages/torch/nn/modules/linear.py", "line": 125, "name": "forward"},
    {"filename": "/usr/src/python-3.11/Objects/call.c", "line": 215, "name": "_PyObject_MakeTpCall"},
    {"filename": "<frozen runpy>", "line": 88, "name": "_run_code"},
]
USER = {"filename": "/home/me/train.py", "line": 42, "name": "step"}
FRAMES = [*TORCH_FRAMES, USER, {"filename": "/home/me/train.py", "line": 99, "name": "<module>"}]


def block(address, size, state, frames=(), requested=None):
    return {
        "address": address,
        "size": size,
        "requested_size": requested or size,
        "state": state,
        "frames": list(frames),
    }


def segment(address, blocks, segment_type="large"):
    return {
        "device": 0,
        "address": address,
        "total_size": sum(b["size"] for b in blocks),
        "segment_type": segment_type,
        "is_expandable": False,
        "blocks": blocks,
    }


def event(action, addr, size, time_us, frames=()):
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": time_us, "frames": list(frames)}


def oom_snapshot():
    big = 0x7F00_0000_0000
    segments = [
        segment(big, [block(big, 8 * MIB, "active_allocated", FRAMES), block(big + 8 * MIB, 12 * MIB, "inactive")]),
        segment(0x1000, [block(0x1000, 512, "active_allocated"), block(0x1200, 2 * MIB - 512, "inactive")], "small"),
    ]
    trace = [
        event("alloc", 0x5000, 4 * MIB, 10),  # lives in a segment released before the snapshot...
        event("segment_alloc", big, 20 * MIB, 20),
        event("alloc", big, 8 * MIB, 30, FRAMES),
        event("free_completed", 0x5000, 4 * MIB, 40),
        event("oom", 3 * GIB // 2, 64 * MIB, 50, FRAMES),  # addr carries device_free for oom
    ]
    return {"segments": segments, "device_traces": [trace], "allocator_settings": {"expandable_segments": False}}


def test_an_oom_event_reports_the_request_the_free_memory_and_the_state_it_met():
    summary = summarize_snapshot(oom_snapshot())
    (oom,) = summary.ooms
    assert (oom.requested_bytes, oom.device_free_bytes, oom.time_us, oom.event_index) == (64 * MIB, 3 * GIB // 2, 50, 4)
    # The buffer began with 512 B and 2 MiB (the small segment) already held; the replay adds the rest.
    assert (oom.allocated_bytes, oom.reserved_bytes) == (8 * MIB + 512, 22 * MIB)
    assert oom.user_frame.label == "/home/me/train.py:42 step"
    assert [f.line for f in oom.frames] == [125, 42, 99]  # Python frames only, innermost first
    timeline = summary.devices[0].timeline
    assert (timeline.allocated_before_trace_bytes, timeline.reserved_before_trace_bytes) == (512, 2 * MIB)
    assert timeline.allocated_bytes == (4 * MIB + 512, 4 * MIB + 512, 12 * MIB + 512, 8 * MIB + 512, 8 * MIB + 512)
    assert summary.headline == (
        "22.0 MiB reserved, 8.0 MiB allocated; 14.0 MiB free inside split segments (64% of reserved); "
        "OOM at 64.0 MiB request"
    )


def test_the_user_frame_skips_torch_cpp_interpreter_and_frozen_frames():
    assert user_frame(FRAMES).label == "/home/me/train.py:42 step"
    assert user_frame(TORCH_FRAMES) is None
    assert user_frame([{"name": "no file"}, {"filename": "<stdin>", "line": 1}]).label == "<stdin>:1 ?"


def test_sites_come_from_the_trace_when_blocks_carry_no_stacks():
    snapshot = oom_snapshot()
    for seg in snapshot["segments"]:
        for b in seg["blocks"]:
            b["frames"] = []
    summary = summarize_snapshot(snapshot)
    assert summary.site_source == "trace"
    assert [(s.label, s.bytes, s.count) for s in summary.top_sites] == [("/home/me/train.py:42 step", 8 * MIB, 1)]


def test_a_long_trace_is_downsampled_without_losing_its_spike():
    trace = []
    for i in range(50_000):
        size = GIB if i == 30_001 else MIB  # one alloc, freed by the next event: a one-point spike
        trace += [event("alloc", 0x100, size, 2 * i), event("free_completed", 0x100, size, 2 * i + 1)]
    trace[60_003]["time_us"] = None  # one entry without a time: the axis becomes the event index
    snapshot = {"segments": [], "device_traces": [trace]}
    started = time.perf_counter()
    timeline = summarize_snapshot(snapshot).devices[0].timeline
    assert time.perf_counter() - started < 5
    assert len(timeline.x) <= TIMELINE_MAX_POINTS and timeline.x_unit == "event"
    assert (min(timeline.allocated_bytes), max(timeline.allocated_bytes)) == (0, GIB)


def test_downsampling_keeps_every_point_when_few_and_the_ends_always():
    assert downsample_indices([[5, 1, 9]], 10) == [0, 1, 2]
    keep = downsample_indices([list(range(10_000))], 100)
    assert keep[0] == 0 and keep[-1] == 9_999 and len(keep) <= 100


@pytest.mark.parametrize(
    "data",
    [{"state": {}}, 42, {"segments": [{"device": 0}]}, [1, 2], {"segments": "x"}, {"segments": [1]}],
    ids=["no-segments", "int", "segment-without-size", "list-of-ints", "segments-not-a-list", "segment-not-a-dict"],
)
def test_data_that_is_not_a_snapshot_is_a_format_error(data):
    with pytest.raises(SnapshotFormatError, match="not .*a PyTorch memory snapshot"):
        summarize_snapshot(data)


# --- files ------------------------------------------------------------------------------------


def test_our_runners_gzip_snapshot_reads_the_same_as_the_plain_pickle(tmp_path):
    raw, summary = load(LINEAR)
    path = tmp_path / "oom_snapshot.pickle.gz"
    path.write_bytes(gzip.compress(pickle.dumps(raw, protocol=4), compresslevel=6))  # as save_snapshot writes
    assert read_snapshot(path) == summary
    assert read_snapshot(io.BytesIO(path.read_bytes())) == summary  # an upload


def test_size_cap_and_truncation_are_clear_errors(tmp_path):
    path = fixture(LINEAR)
    with pytest.raises(SnapshotTooLargeError, match=rf"{path.name}: .* on disk, over the 1.0 KiB"):
        read_snapshot(path, max_bytes=1024)
    truncated = tmp_path / "cut.pickle"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(SnapshotFormatError, match="cut.pickle: not a readable pickle"):
        read_snapshot(truncated)


def test_a_hostile_snapshot_is_refused(tmp_path):
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(b"cos\nsystem\n(S'touch owned'\ntR.")
    with pytest.raises(UnsafePickleError, match="os.system"):
        read_snapshot(path)
