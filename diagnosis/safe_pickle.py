"""Load an untrusted pickle (a user's memory snapshot) without running any code from it.

`pickle.load` calls whatever a pickle names, so a shared `snapshot.pickle` could run
`os.system` on the machine that opens it (REFERENCE §1). Snapshots hold only builtin containers
and scalars, and the pickle protocol builds those with its own opcodes; the only way a pickle can
reach code is to name a global (`find_class`) or ask for a persistent id (`persistent_load`).
We refuse both, except for a handful of builtin types that older protocols can only express by
name. The stream is read as the unpickler asks for it, through a counter that stops at a byte
cap, so neither a huge file nor a small gzip bomb is ever held in memory whole.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from diagnosis.units import human_bytes

BYTES_PER_KIB = 1024
BYTES_PER_MIB = 1024**2
BYTES_PER_GIB = 1024**3
DEFAULT_MAX_BYTES = 1 * BYTES_PER_GIB
GZIP_MAGIC = b"\x1f\x8b"


class SnapshotError(Exception):
    """A snapshot could not be read; the message says why and is fit to show a user."""


class UnsafePickleError(SnapshotError):
    """The pickle names code (a global or a persistent id): refused before anything runs."""


class SnapshotTooLargeError(SnapshotError):
    """The file, or what it decompresses to, is past the caller's byte cap."""


class SnapshotFormatError(SnapshotError):
    """Not a readable pickle: truncated, corrupt, or not a pickle at all."""


def _bytes(source: bytes = b"") -> bytes:
    """`bytes` as protocols 0-2 rebuild an empty one, minus `bytes(n)`, which would allocate n zero bytes."""
    if not isinstance(source, bytes):
        raise UnsafePickleError(f"refused bytes({type(source).__name__}): only bytes are rebuilt")
    return source


def _bytearray(source: bytes | str = b"", encoding: str | None = None) -> bytearray:
    """`bytearray` as protocols 0-4 rebuild it, minus `bytearray(n)`, which would allocate n zero bytes."""
    if isinstance(source, bytes) and encoding is None:
        return bytearray(source)
    if isinstance(source, str) and encoding in _LATIN_1:
        return bytearray(source, "latin-1")
    raise UnsafePickleError(f"refused bytearray({type(source).__name__}, {encoding!r}): only bytes are rebuilt")


def _latin_1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocols 0-2 use it for bytes, minus the other codecs it could look up."""
    if not isinstance(text, str) or encoding not in _LATIN_1:
        raise UnsafePickleError(f"refused _codecs.encode(..., {encoding!r}): only latin-1 bytes are rebuilt")
    return text.encode("latin-1")


_LATIN_1 = ("latin1", "latin-1")

# The only names a pickle may load. Protocols < 4 have no opcode for set/frozenset, none before 5
# for bytearray, none ever for complex, and protocols < 3 none for bytes: `pickle.dumps` writes
# `builtins.<type>` (spelt `__builtin__` below protocol 3) or `_codecs.encode` + REDUCE for them,
# so refusing these names would refuse plain builtin data. Each maps to a constructor that only
# copies its arguments (the risky forms narrowed above). No snapshot fixture needs anything else:
# all 11 are protocol 4 and name no global, so e.g. `collections.OrderedDict` stays out.
_ALLOWED = {
    ("_codecs", "encode"): _latin_1_encode,
    **{
        (module, name): value
        for module in ("builtins", "__builtin__")
        for name, value in (
            ("set", set),
            ("frozenset", frozenset),
            ("complex", complex),
            ("bytes", _bytes),
            ("bytearray", _bytearray),
        )
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load global {module}.{name}: snapshots hold only builtin data, "
                "so this pickle was made to run code"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"refused persistent id {pid!r}: snapshots never use persistent ids")


class _CappedReader:
    """The file interface `pickle.Unpickler` uses, counting bytes and never reading past the cap.

    A pickle can ask for any length (a FRAME or BINBYTES8 header of 2**60): each request is
    clipped to one byte past what the cap still allows, so the overflow is detected after reading
    at most `max_bytes + 1` bytes in all, whatever the header claims."""

    def __init__(self, raw: BinaryIO, max_bytes: int, what: str):
        self._raw = raw
        self._max_bytes = max_bytes
        self._what = what
        self.bytes_read = 0
        if hasattr(raw, "peek"):
            # Lets the C unpickler prefetch instead of calling read() per opcode on unframed
            # (protocol < 4) pickles. Not counted: peeked bytes are read, and counted, before
            # the unpickler moves past them.
            self.peek = raw.peek

    def _clip(self, n: int | None) -> int:
        left = self._max_bytes - self.bytes_read
        return left + 1 if n is None or n < 0 or n > left else n

    def _count(self, n: int) -> None:
        self.bytes_read += n
        if self.bytes_read > self._max_bytes:
            raise SnapshotTooLargeError(
                f"{self._what}: more than {human_bytes(self._max_bytes)} ({self._max_bytes:,} bytes), the size cap; "
                "not loaded (raise max_bytes if this snapshot is trusted to fit in memory)"
            )

    def read(self, n: int | None = -1) -> bytes:
        data = self._raw.read(self._clip(n))
        self._count(len(data))
        return data

    def readline(self, limit: int | None = -1) -> bytes:
        data = self._raw.readline(self._clip(limit))
        self._count(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        # Views released on the way out: a view still alive when the unpickler frees its buffer
        # is a SystemError ("deallocated bytearray object has exported buffers").
        with memoryview(buffer) as view, view.cast("B") as flat, flat[: self._clip(len(flat))] as target:
            n = self._raw.readinto(target) or 0
        self._count(n)
        return n


def _is_gzip(stream: BinaryIO) -> bool:
    if hasattr(stream, "peek"):
        return stream.peek(2)[:2] == GZIP_MAGIC
    start = stream.tell()
    magic = stream.read(2)
    stream.seek(start)
    return magic == GZIP_MAGIC


# What a corrupt or truncated stream raises from the unpickler or the gzip/zlib layers.
_FORMAT_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    struct.error,
    zlib.error,
    gzip.BadGzipFile,
)


def load_stream(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES, name: str = "snapshot") -> object:
    """Unpickle builtin data from a binary stream (plain or gzip), reading it incrementally.

    The stream needs `peek` (files opened with "rb") or `seek` (BytesIO, uploads) so the gzip
    magic can be looked at without consuming it. `max_bytes` caps the pickle bytes read,
    after decompression."""
    try:
        compressed = _is_gzip(stream)
        source = gzip.GzipFile(fileobj=stream, mode="rb") if compressed else stream
        what = f"{name} (decompressed)" if compressed else name
        return _RestrictedUnpickler(_CappedReader(source, max_bytes, what)).load()
    except SnapshotError:
        raise
    except MemoryError as error:
        # The unpickler allocates what a length header declares before reading it.
        raise SnapshotFormatError(f"{name}: declares an object too large to allocate (corrupt or hostile)") from error
    except _FORMAT_ERRORS as error:
        raise SnapshotFormatError(
            f"{name}: not a readable pickle (truncated or corrupt): {type(error).__name__}: {error}"
        ) from error


def load_path(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> object:
    """Unpickle builtin data from a file; a file already past the cap on disk is refused unread."""
    path = Path(path)
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > max_bytes:
            raise SnapshotTooLargeError(
                f"{path.name}: {human_bytes(size)} ({size:,} bytes) on disk, over the {human_bytes(max_bytes)} "
                f"({max_bytes:,} bytes) size cap; not loaded (raise max_bytes if this snapshot is trusted)"
            )
        return load_stream(stream, max_bytes, name=path.name)


def loads(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> object:
    """`pickle.loads` for bytes already in memory (tests, uploads), with the same refusals."""
    return load_stream(io.BytesIO(data), max_bytes, name="pickled bytes")
