import builtins
import copyreg
import gzip
import io
import os
import pickle
import struct
import subprocess
from pathlib import Path

import pytest

from diagnosis.safe_pickle import (
    SnapshotFormatError,
    SnapshotTooLargeError,
    UnsafePickleError,
    load_path,
    load_stream,
    loads,
)
from diagnosis.units import human_bytes

MIB = 1024**2


class Payload:
    """Pickles as a call to `func(*args)`: what a hostile snapshot would carry."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(marker: Path):
    return {
        "system": Payload(os.system, f"touch {marker}"),
        "eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "open": Payload(builtins.open, str(marker), "w"),
        # A bound method pickles as getattr(obj, name): the classic way to reach any callable.
        "getattr": Payload(Path(marker).write_text, "owned"),
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("callable_name", ["system", "eval", "Popen", "open", "getattr"])
def test_a_pickle_that_calls_code_is_refused_before_anything_runs(tmp_path, protocol, callable_name):
    marker = tmp_path / "owned"
    # Nested inside real-looking data, so refusal cannot depend on the payload being at the top.
    data = pickle.dumps({"segments": [{"blocks": [hostile_payloads(marker)[callable_name]]}]}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=rf"refused to load global \S*{callable_name}"):
        loads(data)
    assert not marker.exists()


# Hand-written opcode streams: globals reached without __reduce__, in each protocol's spelling.
GADGETS = [
    ("getattr", "builtins.getattr", b"cbuiltins\ngetattr\n."),
    ("import", "__builtin__.__import__", b"c__builtin__\n__import__\n."),
    ("reconstructor", "copyreg._reconstructor", b"ccopyreg\n_reconstructor\n."),
    ("attrgetter", "operator.attrgetter", b"coperator\nattrgetter\n."),
    # getattr(__import__('os'), 'system')('touch owned'), protocol 0.
    (
        "getattr-chain",
        "builtins.getattr",
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch owned'\ntR.",
    ),
    # Protocol 4 STACK_GLOBAL; a dotted name under an allowed module would reach `type`.
    ("dotted-name", "builtins.set.__class__", b"\x80\x04\x8c\x08builtins\x94\x8c\x0dset.__class__\x94\x93."),
    ("INST", "os.system", b"(ios\nsystem\nS'touch owned'\n."),
]


@pytest.mark.parametrize(("global_name", "data"), [g[1:] for g in GADGETS], ids=[g[0] for g in GADGETS])
def test_protocol_level_tricks_are_refused_by_name(global_name, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePickleError, match=f"global {global_name}:"):
        loads(data)
    assert not (tmp_path / "owned").exists()


def test_extension_registry_codes_go_through_the_same_refusal():
    copyreg.add_extension("os", "system", 240)
    try:
        with pytest.raises(UnsafePickleError, match="global os.system"):
            loads(b"\x80\x02\x82\xf0.")  # EXT1 240
    finally:
        copyreg.remove_extension("os", "system", 240)


@pytest.mark.parametrize("data", [b"P1\n.", b"\x80\x02K\x01Q."], ids=["PERSID", "BINPERSID"])
def test_persistent_ids_are_refused(data):
    with pytest.raises(UnsafePickleError, match="persistent id"):
        loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"c__builtin__\nbytearray\n(I1099511627776\ntR.",  # bytearray(1 TiB)
        b"c__builtin__\nbytes\n(I1099511627776\ntR.",
        b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
    ],
    ids=["bytearray(n)", "bytes(n)", "codecs"],
)
def test_allowed_constructors_refuse_their_risky_forms(data):
    with pytest.raises(UnsafePickleError, match="refused"):
        loads(data)


BUILTIN_DATA = {
    "segments": [{"size": 2**40, "frames": [{"filename": "é.py", "line": 3}], "ok": True, "none": None}],
    "set": {1, 2},
    "frozenset": frozenset({"a"}),
    "complex": 1 + 2j,
    "float": 0.5,
    "bytes": b"\x00\xff",
    "empty": [b"", bytearray(), ()],
    "bytearray": bytearray(b"xy"),
    "big": -(10**40),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_builtin_containers_and_scalars_load_in_every_protocol(protocol):
    assert loads(pickle.dumps(BUILTIN_DATA, protocol=protocol)) == BUILTIN_DATA


def test_gzip_is_recognised_by_its_magic_bytes_not_the_file_name(tmp_path):
    compressed, plain = tmp_path / "snapshot.pickle", tmp_path / "snapshot.pickle.gz"
    compressed.write_bytes(gzip.compress(pickle.dumps(BUILTIN_DATA)))
    plain.write_bytes(pickle.dumps(BUILTIN_DATA))
    assert load_path(compressed) == load_path(plain) == BUILTIN_DATA


def test_gzip_does_not_hide_a_hostile_pickle(tmp_path):
    path = tmp_path / "oom_snapshot.pickle.gz"
    path.write_bytes(gzip.compress(pickle.dumps(Payload(os.system, f"touch {tmp_path / 'owned'}"))))
    with pytest.raises(UnsafePickleError, match="system"):
        load_path(path)
    assert not (tmp_path / "owned").exists()


class SpyStream(io.BytesIO):
    """Records every read the unpickler makes, to show the file is streamed, never slurped."""

    def __init__(self, data):
        super().__init__(data)
        self.requests, self.returned = [], 0

    def read(self, n=-1):
        self.requests.append(n)
        data = super().read(n)
        self.returned += len(data)
        return data

    def readinto(self, buffer):
        self.requests.append(len(buffer))
        n = super().readinto(buffer)
        self.returned += n
        return n


def test_the_stream_is_read_in_frames_not_whole():
    data = pickle.dumps([f"frame {i}" * 4 for i in range(200_000)], protocol=4)
    assert len(data) > 5 * MIB
    stream = SpyStream(data)
    assert len(load_stream(stream)) == 200_000
    assert all(0 <= n <= MIB for n in stream.requests), max(stream.requests)


def test_a_file_over_the_cap_is_refused_unread_with_its_size(tmp_path):
    path = tmp_path / "big.pickle"
    path.write_bytes(pickle.dumps(list(range(5000)), protocol=4))
    size = path.stat().st_size
    with pytest.raises(
        SnapshotTooLargeError, match=rf"big.pickle: .*\({size:,} bytes\) on disk, over .*\(1,000 bytes\)"
    ):
        load_path(path, max_bytes=1000)


def test_a_stream_stops_one_byte_past_the_cap():
    stream = SpyStream(pickle.dumps(list(range(5000)), protocol=4))
    with pytest.raises(SnapshotTooLargeError, match=r"more than 1000 B \(1,000 bytes\), the size cap"):
        load_stream(stream, max_bytes=1000)
    assert stream.returned <= 1000 + 1 + 2  # plus the two magic bytes looked at first


def test_a_gzip_bomb_is_stopped_at_the_cap_after_decompression():
    bomb = gzip.compress(pickle.dumps(b"\0" * (64 * MIB), protocol=4))
    assert len(bomb) < MIB
    with pytest.raises(SnapshotTooLargeError, match=r"\(decompressed\): more than 1.0 MiB"):
        loads(bomb, max_bytes=MIB)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a pickle at all",
        pickle.dumps(BUILTIN_DATA, protocol=4)[:-20],
        gzip.compress(pickle.dumps(BUILTIN_DATA))[:-12],
        b"\x1f\x8b" + b"\x00" * 30,
        b"\x80\x04\x95" + struct.pack("<Q", 2**60) + b"N.",  # a frame claiming 1 EiB
        b"\x80\x04\x8e" + struct.pack("<Q", 2**50) + b"abc",  # bytes claiming 1 PiB
    ],
    ids=["empty", "text", "truncated", "truncated-gzip", "bad-gzip", "huge-frame", "huge-bytes"],
)
def test_corrupt_input_is_a_format_error_never_a_raw_traceback(data):
    with pytest.raises(SnapshotFormatError, match="pickled bytes: "):
        loads(data)


def test_binary_units_in_messages():
    assert [human_bytes(n) for n in (512, 1536, 3 * MIB, 1024**3 * 12.3)] == ["512 B", "1.5 KiB", "3.0 MiB", "12.3 GiB"]
