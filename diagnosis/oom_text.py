"""Reads PyTorch out-of-memory messages back into numbers, from any era, device and log decoration.

A post-mortem often has only text: a log, a pasted traceback, a CI page. The allocator printed what
it knew at the failure (the request, capacity, free, allocated, cached, other processes), so reading
it back recovers the state of the device without a snapshot. The forms, with where each comes from
(tests/fixtures/oom_messages/messages.yaml holds a real example of each, with its URL):

  era                backend      form (A request, T total, F free, X allocated, R reserved, U cached)
  <=1.3 cached       cuda         "CUDA out of memory. Tried to allocate A (GPU d; T total capacity; X already
                                   allocated; F free; U cached)"
                                   aten/src/THC/THCCachingAllocator.cpp after pytorch#13751: U is
                                   amount_cached - amount_allocated, the unused cache, not the total.
  <=2.0              cuda, xpu    "... F free; [C allowed; ]R reserved in total by PyTorch)" + max_split_size_mb
                                   hint. c10/cuda/CUDACachingAllocator.cpp 1.4-2.0; IPEX's XPU drops "F free".
  2.1                cuda         "Tried to allocate A. GPU d has a total capacty of T of which F is free.
                                   [Process P has M memory in use. ]... Of the allocated memory X is allocated
                                   by PyTorch, and U is reserved by PyTorch but unallocated." (pytorch#99699)
  >=2.1              cuda, hip,   the same spelled "capacity", with "[C allowed; ]" and "with Q allocated in
                     xpu          private pools (e.g., CUDA Graphs), " (pytorch#124673); X includes Q.
                                   c10/cuda/CUDACachingAllocator.cpp at 001074d2, c10/xpu/XPUCachingAllocator.cpp.
  mallocasync        cuda         "Allocation on device d would exceed allowed memory. (out of memory)
                                   Currently allocated : X Requested : A Device limit : T Free (according to
                                   CUDA): F PyTorch limit (...) : C" (c10/cuda/CUDAMallocAsyncAllocator.cpp)
  error              cuda, hip    "CUDA error: out of memory": the driver, not the allocator; no numbers.
  mps                mps          "MPS backend out of memory (MPS allocated: X, other allocations: O[, max
                                   allowed: C]). Tried to allocate A on private pool." (ATen/mps/MPSAllocator.mm)
  cpu                cpu          "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"
                                   (POSIX) / "...: not enough memory: ..." (Windows); c10/core/impl/alloc_cpu.cpp
  python             python       a bare "MemoryError" line: the interpreter's own allocation failed.
  <layout>           accelerator  any GPU layout above pasted without its first words ("Tried to allocate ...").
  (cut short)        any          the first words survived, the layout's did not: only the request is read.

Sizes come from c10's format_size: "N bytes" up to 1 KiB, then "%.2f KiB|MiB|GiB"; MPS once printed
KB/MB/GB for the same powers of 1024. "Tried to allocate" is the allocator's rounded request.

Text is matched with all whitespace removed, so a terminal or logger that re-wraps a message anywhere,
even inside a number or a word, changes nothing; log prefixes are blanked per line first, and
"[rankN]:" markers route each rank's text to its own stream so interleaved ranks do not mix. Every
pattern is anchored on a literal and bounded, so a megabyte of garbage costs linear time.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

_UNITS: Final = {
    "B": 1,
    "bytes": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    # MPSAllocator.h's own format_size divides by 1024 but prints KB/MB/GB.
    "KB": 1024,
    "MB": 1024**2,
    "GB": 1024**3,
    "TB": 1024**4,
}

# A printed size (value, unit) on whitespace-free text; bounded so no input makes it backtrack far.
_NUMBER: Final = r"(\d{1,24}(?:\.\d{1,6})?)(bytes|KiB|MiB|GiB|TiB|KB|MB|GB|TB|B)"

# No device holds an exbibyte: a larger figure is a sentinel, not a measurement. NVML's usedGpuMemory
# and an unset cudaMallocAsync limit print SIZE_MAX as "17179869184.00 GiB". Dropping them also keeps
# every value inside a signed 64-bit database column.
MAX_PLAUSIBLE_BYTES: Final = 2**60

# Past this many characters (whitespace removed) a message has surely ended; bounds the work per message
# when its closing words were cut off. The longest real ones (eight NVML process entries) are ~900.
_MAX_MESSAGE_CHARS: Final = 2400
# How much text before a message is searched for the traceback it ends: keeps the total linear.
_MAX_CONTEXT_CHARS: Final = 64_000

LOCATIONS: Final = (
    "attention",
    "mlp",
    "embedding",
    "logits_loss",
    "backward",
    "optimizer_step",
    "checkpoint_save",
    "data",
    "model_load",
    "evaluation",
)


def size_to_bytes(value: str, unit: str) -> int:
    """Bytes from a printed size; the printed value already carries format_size's rounding."""
    return round(float(value) * _UNITS[unit])


@dataclass(frozen=True)
class ProcessUsage:
    """One NVML entry of a >= 2.1 message; pid is None for "this process" (ours, including non-PyTorch)."""

    pid: int | None
    bytes: int | None


@dataclass(frozen=True)
class OomMessage:
    """One out-of-memory message as printed, in bytes; a figure the message does not carry is None.

    allocated_bytes is what the allocator handed to tensors (in >= 2.1 including private pools),
    reserved_bytes what it held from the driver, reserved_unallocated_bytes the difference (the cache).
    """

    backend: str  # cuda | hip | xpu | mps | cpu | python | accelerator (a message without its device word)
    era: str  # the message layout, e.g. "cuda<=1.3 cached", "cuda<=2.0", "cuda 2.1", "cuda>=2.1", "mps"
    device: int | str | None = None  # GPU index, "cpu" for host memory, None when not printed (MPS)
    requested_bytes: int | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    reserved_unallocated_bytes: int | None = None
    allowed_bytes: int | None = None
    private_pool_bytes: int | None = None
    this_process_bytes: int | None = None
    other_allocations_bytes: int | None = None  # MPS: memory of this process not from the MPS allocator
    process_bytes: tuple[ProcessUsage, ...] = ()
    rank: int | None = None  # from a "[rank3]:" prefix
    location: str | None = None  # one of LOCATIONS, from the traceback above the message
    frame: str | None = None  # the frame the location came from, else the innermost named frame
    text: str = ""  # the message as found, whitespace collapsed

    @property
    def outside_pytorch_bytes(self) -> int | None:
        """Device memory PyTorch's allocator does not hold: T - F - R (CUDA context, NCCL, other processes).

        The share of an OOM that no setting of this process's batch size can win back. On MPS it is the
        printed "other allocations". None when a term is missing or the figures contradict each other
        (shared-memory GPUs report allocated > total).
        """
        if self.backend == "mps":
            return self.other_allocations_bytes
        if None in (self.total_bytes, self.free_bytes, self.reserved_bytes):
            return None
        outside = self.total_bytes - self.free_bytes - self.reserved_bytes
        return outside if outside >= 0 else None

    @property
    def not_in_tensors_bytes(self) -> int | None:
        """T - X - F: device memory not held by live tensors (cache + outside), for messages without R.

        A large value with a small request is fragmentation or another tenant, not the model's size.
        """
        if None in (self.total_bytes, self.allocated_bytes, self.free_bytes):
            return None
        rest = self.total_bytes - self.allocated_bytes - self.free_bytes
        return rest if rest >= 0 else None

    def to_json(self) -> dict:
        """The CLI's JSON contract (the keys of not_oom_json()), plus what else the message told."""
        return {
            "is_oom": True,
            "device": self.device,
            "requested_bytes": self.requested_bytes,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "reserved_unallocated_bytes": self.reserved_unallocated_bytes,
            "process_bytes": [{"pid": p.pid, "bytes": p.bytes} for p in self.process_bytes],
            "backend": self.backend,
            "era": self.era,
            "rank": self.rank,
            "allowed_bytes": self.allowed_bytes,
            "private_pool_bytes": self.private_pool_bytes,
            "this_process_bytes": self.this_process_bytes,
            "other_allocations_bytes": self.other_allocations_bytes,
            "outside_pytorch_bytes": self.outside_pytorch_bytes,
            "not_in_tensors_bytes": self.not_in_tensors_bytes,
            "location": self.location,
            "frame": self.frame,
        }


NOT_OOM_JSON: Final = MappingProxyType(
    {
        "is_oom": False,
        "device": None,
        "requested_bytes": None,
        "total_bytes": None,
        "free_bytes": None,
        "allocated_bytes": None,
        "reserved_bytes": None,
        "reserved_unallocated_bytes": None,
        "process_bytes": (),
    }
)


def not_oom_json() -> dict:
    """The CLI's answer for text without an out-of-memory message: the contract's keys, all empty."""
    return {**NOT_OOM_JSON, "process_bytes": []}


def parse_oom_messages(text: str) -> list[OomMessage]:
    """Every out-of-memory message in `text`, in the order they appear; [] when there is none."""
    if not isinstance(text, str) or not text:
        return []
    found: list[tuple[int, OomMessage]] = []
    for stream in _split_ranks(text):
        found.extend(_parse_stream(stream))
    found.sort(key=lambda pair: pair[0])
    return [message for _, message in found]


def parse_oom(text: str) -> OomMessage | None:
    """The first out-of-memory message in `text`, or None."""
    messages = parse_oom_messages(text)
    return messages[0] if messages else None


def requested_bytes(message: str) -> int | None:
    """The size of the allocation that failed, or None if the message does not say."""
    parsed = parse_oom(message)
    return parsed.requested_bytes if parsed else None


# --------------------------------------------------------------------------- streams: ranks and prefixes

# torchrun prints "[rank3]: " before each line of a worker's error (and "[default3]:" with --tee);
# with several ranks failing at once their lines interleave, sometimes within one line.
_RANK_MARK = re.compile(r"\[\s*+(?:rank|default)\s*+(\d{1,7})\s*+\]:?")

# Prefixes loggers put before every line; blanked (same length, so offsets hold) before matching so a
# message wrapped across prefixed lines reads as one. Each starts with a literal and cannot match inside
# a PyTorch message.
_LINE_PREFIX = re.compile(
    r"^[ \t]*+(?:(?:"
    r"\([\w.-]+ pid=\d+(?:, ip=[\d.]+)?\)"  # vLLM / Ray workers: "(EngineCore pid=104)"
    r"|(?:ERROR|WARNING|INFO|DEBUG|CRITICAL)[ \t]++\d\d-\d\d \d\d:\d\d:\d\d[ \t]++\[?[\w.]+:\d+\]"  # vLLM logger
    r"|\[?\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?\]?"  # ISO timestamps
    r"|(?:ERROR|WARNING|INFO|DEBUG|CRITICAL)(?=[ \t])"  # a bare level column
    r"|>++(?=[ \t])"  # quoted text, doctest prompts
    r"|E(?=[ \t]{3})"  # pytest's failure lines
    r")[ \t]*+)++",
    re.MULTILINE,
)
# Box-drawing characters (rich tracebacks and tables) never occur in a message; blanking them frees
# the code inside rich's frames for the location search.
_BOX = {code: " " for code in range(0x2500, 0x2580)} | {ord("❱"): " "}


@dataclass
class _Stream:
    """One rank's text (or the unranked text), stitched from its pieces, with their original offsets."""

    rank: int | None
    pieces: list[tuple[int, str]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)

    def stitch(self) -> str:
        """The stream's text in one piece (remembering where each piece starts in it)."""
        self._starts = list(itertools.accumulate((len(piece) for _, piece in self.pieces[:-1]), initial=0))
        return "".join(piece for _, piece in self.pieces)

    def original_offset(self, raw_index: int) -> int:
        """Where a character of the stitched text was in the input, so messages sort as they appeared."""
        k = max(bisect.bisect_right(self._starts, raw_index) - 1, 0)
        return self.pieces[k][0] + raw_index - self._starts[k]


def _split_ranks(text: str) -> list[_Stream]:
    """Route text after each "[rankN]:" to rank N's stream until the next marker; newlines do not switch."""
    streams: dict[int | None, _Stream] = {}
    rank, start = None, 0
    for mark in _RANK_MARK.finditer(text):
        streams.setdefault(rank, _Stream(rank)).pieces.append((start, text[start : mark.start()]))
        rank, start = int(mark.group(1)), mark.end()
    streams.setdefault(rank, _Stream(rank)).pieces.append((start, text[start:]))
    return list(streams.values())


def _clean(raw: str) -> str:
    """Blank log prefixes and box drawing without moving any character."""
    raw = raw.translate(_BOX)
    return _LINE_PREFIX.sub(lambda m: " " * len(m.group()), raw)


class _Squeezed:
    """The text with all whitespace removed, and the way back to positions in the text."""

    def __init__(self, raw: str) -> None:
        self._raw_starts: list[int] = []
        self._starts: list[int] = []
        chunks, total = [], 0
        for run in re.finditer(r"\S+", raw):
            self._raw_starts.append(run.start())
            self._starts.append(total)
            chunks.append(run.group())
            total += len(run.group())
        self.text = "".join(chunks)

    def to_raw(self, index: int) -> int:
        """The position in the text of a character of the squeezed text."""
        if not self._starts:
            return 0
        k = max(bisect.bisect_right(self._starts, index) - 1, 0)
        return self._raw_starts[k] + index - self._starts[k]

    def from_raw(self, raw_index: int) -> int:
        """The squeezed index of the first non-space character at or after raw_index."""
        k = bisect.bisect_right(self._raw_starts, raw_index) - 1
        if k >= 0:
            run_length = (self._starts[k + 1] if k + 1 < len(self._starts) else len(self.text)) - self._starts[k]
            if raw_index < self._raw_starts[k] + run_length:
                return self._starts[k] + raw_index - self._raw_starts[k]
        return self._starts[k + 1] if k + 1 < len(self._starts) else len(self.text)


# --------------------------------------------------------------------------- finding messages

# Alternatives, tried at each position left to right (on whitespace-free text):
_ANCHOR = re.compile(
    # the caching allocator's message; up to 40 characters may sit between the device word and "out of
    # memory" (a logger's column that a re-wrap pushed into the line), but not another device word, so
    # "PYTORCH_CUDA_ALLOC_CONF" ending one message cannot claim the "HIP out of memory" of the next
    r"(?P<gpu>(?P<backend>CUDA|HIP|XPU)(?:(?!CUDA|HIP|XPU).){0,40}?outofmemory\.?\(?(?=Triedtoallocate))"
    r"|(?P<mps>MPSbackendoutofmemory)"
    r"|(?P<cpu>DefaultCPUAllocator:(?:can'tallocatememory|notenoughmemory):youtriedtoallocate)"
    r"|(?P<async>(?:OutOfMemoryError:)?Allocationondevice(?=\d{1,4}wouldexceedallowedmemory)"
    r"|OutOfMemoryError:Allocationondevice)"
    r"|(?P<driver>(?P<driver_backend>CUDA|HIP)error:outofmemory)"
    r"|(?P<weak>Triedtoallocate(?=\d))"  # a message pasted without its first words
)
_PY_MEMORY_ERROR = re.compile(r"^[ \t]*+(?:builtins\.)?MemoryError(?::[^\n]*+)?$", re.MULTILINE)

# Where each form's own words end (the hints after them change between releases and are never read).
_GPU_END = re.compile(r"butunallocated\.?|reservedintotalbyPyTorch\)?|cached\)")
_END = {
    "gpu": _GPU_END,
    "weak": _GPU_END,
    "mps": re.compile(r"(?:private|shared)pool\.?"),
    "cpu": re.compile(r"bytes\.?"),
    "async": re.compile(r"memoryfraction\):" + _NUMBER),
}


@dataclass(frozen=True)
class _Anchor:
    """Where a message's first words were found, and which form they announce."""

    kind: str
    start: int  # squeezed index
    end: int  # squeezed index where the anchor words end
    backend: str | None


def _parse_stream(stream: _Stream) -> Iterator[tuple[int, OomMessage]]:
    """One rank's messages, each with its offset in the input so all ranks can be put back in order."""
    raw = _clean(stream.stitch())
    squeezed = _Squeezed(raw)
    previous_end = 0
    for anchor, end, closed in _message_spans(_anchors(raw, squeezed), squeezed.text):
        raw_start, raw_end = _raw_bounds(raw, squeezed, anchor, end, closed)
        location, frame = _locate(raw[max(previous_end, raw_start - _MAX_CONTEXT_CHARS) : raw_start])
        message = _build(anchor, squeezed.text[anchor.start : end])
        text = " ".join(raw[raw_start:raw_end].split())
        yield (
            stream.original_offset(raw_start),
            replace(message, rank=stream.rank, location=location, frame=frame, text=text),
        )
        previous_end = raw_end


def _raw_bounds(raw: str, squeezed: _Squeezed, anchor: _Anchor, end: int, closed: bool) -> tuple[int, int]:
    """The message's place in the text. One cut short ends at its last size or its first line's end,
    so the log lines that follow are neither its text nor taken from the next message's traceback."""
    start = squeezed.to_raw(anchor.start)
    if anchor.kind == "python":
        return _line_bounds(raw, start)
    if closed:
        return start, squeezed.to_raw(max(end - 1, anchor.start)) + 1
    sizes = [size.end() for size in _SIZE_ANYWHERE.finditer(squeezed.text, anchor.end, end)]
    last_size = squeezed.to_raw(sizes[-1] - 1) + 1 if sizes else start
    return start, max(last_size, _line_bounds(raw, start)[1])


def _anchors(raw: str, squeezed: _Squeezed) -> list[_Anchor]:
    anchors = []
    for match in _ANCHOR.finditer(squeezed.text):
        kind = next(name for name in ("gpu", "mps", "cpu", "async", "driver", "weak") if match.group(name))
        backend = match.group("backend") or match.group("driver_backend")
        anchors.append(_Anchor(kind, match.start(), match.end(), backend.lower() if backend else None))
    for line in _PY_MEMORY_ERROR.finditer(raw):
        start = squeezed.from_raw(line.start())
        # "torch.OutOf" + newline + "MemoryError: CUDA out of memory...": a wrap, not Python's own error
        if not squeezed.text.endswith("OutOf", 0, start):
            anchors.append(_Anchor("python", start, start + len("MemoryError"), None))
    anchors.sort(key=lambda a: a.start)
    return anchors


def _message_spans(anchors: list[_Anchor], text: str) -> list[tuple[_Anchor, int, bool]]:
    """Each message, where it ends, and whether its closing words were there to say so.

    A message ends at its closing words, else at the next message or a bound. A bare "Tried to allocate"
    inside another message (MPS prints one) is part of it. One sweep in order, so garbage full of
    anchors stays linear.
    """
    strong = [a for a in anchors if a.kind != "weak"]
    strong_end = {
        id(a): _extent(a, text, strong[i + 1].start if i + 1 < len(strong) else len(text)) for i, a in enumerate(strong)
    }
    kept: list[_Anchor] = []
    covered_until = -1
    for anchor in anchors:
        if anchor.kind != "weak":
            kept.append(anchor)
            covered_until = strong_end[id(anchor)][0]
        elif anchor.start >= covered_until:
            kept.append(anchor)
    spans = []
    for i, anchor in enumerate(kept):
        if anchor.kind == "weak":
            end, closed = _extent(anchor, text, kept[i + 1].start if i + 1 < len(kept) else len(text))
        else:
            end, closed = strong_end[id(anchor)]
        spans.append((anchor, end, closed))
    return spans


def _extent(anchor: _Anchor, text: str, limit: int) -> tuple[int, bool]:
    """Past the message's closing words, else `limit` (its numbers are read up to there)."""
    limit = min(limit, anchor.start + _MAX_MESSAGE_CHARS)
    if anchor.kind in ("driver", "python"):
        return anchor.end, True
    closing = _END[anchor.kind].search(text, anchor.end, limit)
    return (closing.end(), True) if closing else (limit, False)


def _line_bounds(raw: str, index: int) -> tuple[int, int]:
    """The line around `index`: a Python MemoryError, or the first line of a message cut short."""
    start = raw.rfind("\n", 0, index) + 1
    end = raw.find("\n", index)
    return start, len(raw) if end < 0 else end


# --------------------------------------------------------------------------- reading the numbers

_SIZE_ANYWHERE = re.compile(_NUMBER)


def _size_after(words: str) -> re.Pattern[str]:
    return re.compile(words + _NUMBER)


def _size_before(words: str) -> re.Pattern[str]:
    return re.compile(_NUMBER + words)


_REQUESTED = _size_after(r"Triedtoallocate")
_GPU_OLD_DEVICE = re.compile(r"\(?GPU(\d{1,4});")
_GPU_NEW_DEVICE = re.compile(r"GPU(\d{1,4})hasatotalcapac")
_OLD = {
    "total_bytes": _size_before(r"totalcapacity"),
    "allocated_bytes": _size_before(r"alreadyallocated"),
    "free_bytes": _size_before(r"free(?:;|\)|$)"),
    "allowed_bytes": _size_before(r"allowed;"),
    "reserved_bytes": _size_before(r"reservedintotalbyPyTorch"),
    "reserved_unallocated_bytes": _size_before(r"cached\)?"),
}
_NEW = {
    "total_bytes": _size_after(r"hasatotalcapac(?:i)?tyof"),
    "free_bytes": re.compile(r"ofwhich" + _NUMBER + r"isfree"),
    "allowed_bytes": _size_before(r"allowed;"),
    "allocated_bytes": _size_after(r"Oftheallocatedmemory"),
}
_PRIVATE_POOL = re.compile(r"isallocatedbyPyTorch,with" + _NUMBER + r"allocatedinprivatepools")
_UNALLOCATED = re.compile(r"and" + _NUMBER + r"isreservedbyPyTorch")
_PROCESS = re.compile(r"(?:Process(\d{1,10})|Includingnon-PyTorchmemory,thisprocess)has" + _NUMBER + r"memoryinuse")
_MPS = {
    "allocated_bytes": _size_after(r"MPSallocated:"),
    "other_allocations_bytes": _size_after(r"otherallocations:"),
    "allowed_bytes": _size_after(r"maxallowed:"),
}
_ASYNC = {
    "allocated_bytes": _size_after(r"Currentlyallocated:"),
    "requested_bytes": _size_after(r"Requested:"),
    "total_bytes": _size_after(r"Devicelimit:"),
    "free_bytes": _size_after(r"Free\(accordingtoCUDA\):"),
    "allowed_bytes": _size_after(r"memoryfraction\):"),
}
_ASYNC_DEVICE = re.compile(r"Allocationondevice(\d{1,4})wouldexceed")
_CPU_REQUEST = re.compile(r"youtriedtoallocate(\d{1,24})bytes")


def _bytes(match: re.Match[str] | None, group: int = 1) -> int | None:
    """The size a match captured, or None for no match or a sentinel too large to be real."""
    if match is None:
        return None
    value = size_to_bytes(match.group(group), match.group(group + 1))
    return value if value <= MAX_PLAUSIBLE_BYTES else None


def _fields(patterns: dict[str, re.Pattern[str]], span: str) -> dict[str, int | None]:
    return {name: _bytes(pattern.search(span)) for name, pattern in patterns.items()}


def _build(anchor: _Anchor, span: str) -> OomMessage:
    """The numbers of one message, read by the reader of the form its first words announced."""
    readers = {"gpu": _read_gpu, "weak": _read_gpu, "mps": _read_mps, "cpu": _read_cpu, "async": _read_async}
    if anchor.kind in readers:
        return readers[anchor.kind](anchor, span)
    if anchor.kind == "driver":
        return OomMessage(backend=anchor.backend or "cuda", era=f"{anchor.backend or 'cuda'} error")
    return OomMessage(backend="python", era="python", device="cpu")


def _read_gpu(anchor: _Anchor, span: str) -> OomMessage:
    """The caching allocator's message, old or new layout, told apart by its words."""
    backend = anchor.backend or "accelerator"
    if "hasatotalcapac" in span:
        return _read_gpu_new(backend, span)
    if "totalcapacity;" in span:
        return _read_gpu_old(backend, span)
    return OomMessage(backend=backend, era=f"{backend} (cut short)", requested_bytes=_bytes(_REQUESTED.search(span)))


def _read_gpu_old(backend: str, span: str) -> OomMessage:
    values = _fields(_OLD, span)
    cached = values.pop("reserved_unallocated_bytes")
    device = _GPU_OLD_DEVICE.search(span)
    if "cached" in span and values["reserved_bytes"] is None:
        era, unallocated = f"{backend}<=1.3 cached", cached
        values["reserved_bytes"] = _plus(values["allocated_bytes"], cached)
    else:
        era, unallocated = f"{backend}<=2.0", _minus(values["reserved_bytes"], values["allocated_bytes"])
    return OomMessage(
        backend=backend,
        era=era,
        device=int(device.group(1)) if device else None,
        requested_bytes=_bytes(_REQUESTED.search(span)),
        reserved_unallocated_bytes=unallocated,
        **values,
    )


def _read_gpu_new(backend: str, span: str) -> OomMessage:
    """The >= 2.1 layout. X already includes private pools (CUDA Graphs), so reserved = X + U."""
    values = _fields(_NEW, span)
    unallocated = _bytes(_UNALLOCATED.search(span))
    processes = tuple(
        ProcessUsage(int(m.group(1)) if m.group(1) else None, _bytes(m, 2)) for m in _PROCESS.finditer(span)
    )
    device = _GPU_NEW_DEVICE.search(span)
    return OomMessage(
        backend=backend,
        era=f"{backend} 2.1" if "hasatotalcapacty" in span else f"{backend}>=2.1",
        device=int(device.group(1)) if device else None,
        requested_bytes=_bytes(_REQUESTED.search(span)),
        reserved_bytes=_plus(values["allocated_bytes"], unallocated),
        reserved_unallocated_bytes=unallocated,
        private_pool_bytes=_bytes(_PRIVATE_POOL.search(span)),
        this_process_bytes=next((p.bytes for p in processes if p.pid is None), None),
        process_bytes=processes,
        **values,
    )


def _read_mps(anchor: _Anchor, span: str) -> OomMessage:
    return OomMessage(backend="mps", era="mps", requested_bytes=_bytes(_REQUESTED.search(span)), **_fields(_MPS, span))


def _read_cpu(anchor: _Anchor, span: str) -> OomMessage:
    request = _CPU_REQUEST.search(span)
    requested = int(request.group(1)) if request else None
    if requested is not None and requested > MAX_PLAUSIBLE_BYTES:
        requested = None
    return OomMessage(backend="cpu", era="cpu", device="cpu", requested_bytes=requested)


def _read_async(anchor: _Anchor, span: str) -> OomMessage:
    device = _ASYNC_DEVICE.search(span)
    return OomMessage(
        backend="cuda",
        era="cuda mallocasync",
        device=int(device.group(1)) if device else None,
        **_fields(_ASYNC, span),
    )


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- where it failed

# A frame header in the traceback styles seen in logs: CPython, IPython, rich, pytest, and a plain
# "file.py:N func ->" call chain.
_FRAME = re.compile(
    r'File "(?P<p1>[^"\n]{1,400})", line \d+, in (?P<f1>[\w.<>]{1,120})'
    r"|File (?P<p2>\S{1,400}):\d+, in (?P<f2>[\w.<>]{1,120})"
    # the two below start only at a token boundary, so each token is tried once
    r"|(?<![^\s\"'(>])(?P<p3>[^\s\"'(]{1,400}\.py):\d+:? in (?P<f3>[\w.<>]{1,120})"
    r"|(?<![^\s\"'(>])(?P<p4>[^\s\"'(]{1,400}\.py):\d+ (?P<f4>\w{1,120})(?= ->| *$)",
    re.MULTILINE,
)
_TRACEBACK_START = "Traceback (most recent call last)"
# Functions that say nothing about where: the frame is named by what its code line matched instead.
_GENERIC = frozenset(
    {
        "forward",
        "_call_impl",
        "_wrapped_call_impl",
        "__call__",
        "<module>",
        "<lambda>",
        "wrapper",
        "decorate_context",
        "inner",
        "func",
        "main",
        "<listcomp>",
        "<genexpr>",
        "maybe_fallback",
        "_use_grad",
    }
)

# Tried in this order on each frame ("function|code|path"), innermost frame first: the innermost frame
# that says anything decides. Phases come before modules so "self.optimizer.step()" inside a forward
# hook still reads as the optimizer.
_RULES: Final = (
    ("backward", re.compile(r"\bbackward\b|_engine_run_backward|\brun_backward\b")),
    (
        "optimizer_step",
        re.compile(
            r"\boptimizer\.step\b|\bscaler\.step\b|_maybe_opt_step|_(?:multi|single)_tensor_\w+|\b_?fused_adamw?\b"
            r"|\badamw?\b|\bzero_grad\b|[\\/]optim[\\/]|\b_foreach_\w+|\bclip_grad_norm_?\b"
        ),
    ),
    (
        "checkpoint_save",
        re.compile(
            r"\bsave_pretrained\b|\b_save_checkpoint\b|\bsave_model\b|\btorch\.save\b|\bsave_file\b"
            r"|\bsave_state\b|\bsave_checkpoint\b|_save_to_state_dict|\bget_peft_model_state_dict\b"
            r"|^_?save\|[^|]*+\|[^|]*?serialization\.py|safetensors[\\/][^|]*?save"
        ),
    ),
    (
        "model_load",
        re.compile(
            r"\bfrom_pretrained\b|_load_pretrained_model|\bload_state_dict\b|_load_state_dict_into_meta_model"
            r"|\bset_module_tensor_to_device\b|_move_model_to_device|\btorch\.load\b|load_sharded_checkpoint"
            r"|_load_best_model|\bprepare_model\b|\b(?:model|module)\w*(?:\.\w+)*\.(?:to|cuda)\("
            r"|^_?load\|[^|]*+\|[^|]*?serialization\.py|^(?:_apply|convert)\|[^|]*+\|[^|]*?module\.py"
        ),
    ),
    (
        "evaluation",
        re.compile(
            r"\bevaluate\b|\bprediction_step\b|\bevaluation_loop\b|\bprediction_loop\b|\bpredict\b"
            r"|\bnested_concat\b|\beval_step\b|\bvalidation_step\b"
        ),
    ),
    (
        "data",
        re.compile(
            r"torch[\\/]utils[\\/]data[\\/]|\b_next_data\b|\b__getitem__\b|\b\w*collate\w*\b|\bpin_memory\b"
            r"|\bDataLoader\b|\bdata_collator\b|datasets[\\/]arrow_dataset\.py|\b_map_single\b"
        ),
    ),
    (
        "logits_loss",
        re.compile(
            r"\blm_head\b|\bcross_entropy\b|\blog_softmax\b|\bloss_function\b|\bForCausalLMLoss\b"
            r"|\bfixed_cross_entropy\b|\bnll_loss\b|\blogits\b|\bcompute_log_probs\b|\bselective_log_softmax\b"
        ),
    ),
    (
        "embedding",
        re.compile(
            r"\bembed_tokens\b|\bembedding\b|\bEmbedding\b|\bwte\b|\bget_input_embeddings\b"
            r"|torch[\\/]nn[\\/]modules[\\/]sparse\.py"
        ),
    ),
    (
        "attention",
        re.compile(
            r"\b\w*attn\w*\b|\b\w*[Aa]ttention\w*\b|\bsoftmax\b|\brepeat_kv\b|\bflash\w*|\bsdpa\w*|\b[qkvo]_proj\b"
        ),
    ),
    (
        "mlp",
        re.compile(
            r"\bmlp\b|\bMLP\b|\bfeed_forward\b|\bffn\b|\b(?:down|up|gate)_proj\b|\bact_fn\b|\bexperts?\b"
            r"|\bdense_h_to_4h\b|\bdense_4h_to_h\b|\bc_fc\b|\bfc[12]\b"
        ),
    ),
)


@dataclass
class _Frame:
    func: str | None
    path: str
    code: list[str] = field(default_factory=list)

    def key(self) -> str:
        return f"{self.func or ''}|{' '.join(self.code)}|{self.path}"


def _locate(context: str) -> tuple[str | None, str | None]:
    """The location category and frame name from the traceback that ends where the message starts."""
    start = context.rfind(_TRACEBACK_START)
    frames = _frames(context[start:] if start >= 0 else context[-8000:])
    for frame in reversed(frames):
        for category, rule in _RULES:
            match = rule.search(frame.key())
            if match:
                return category, _frame_name(frame, match.group())
    named = next((f.func for f in reversed(frames) if f.func and f.func not in _GENERIC), None)
    return None, named


def _frame_name(frame: _Frame, matched: str) -> str:
    if frame.func and frame.func not in _GENERIC:
        return frame.func
    return matched.strip("|.(")


def _frames(text: str) -> list[_Frame]:
    """Frames in order, outermost first; code lines attach to the frame above them."""
    frames: list[_Frame] = []
    for line in text.splitlines():
        headers = list(_FRAME.finditer(line))
        if headers:
            for header in headers:
                func = next(header.group(f"f{i}") for i in range(1, 5) if header.group(f"f{i}"))
                path = next(header.group(f"p{i}") for i in range(1, 5) if header.group(f"p{i}"))
                frames.append(_Frame(func, path))
            continue
        code = line.strip()
        if not code or set(code) <= set("^~ "):
            continue
        if not frames:
            frames.append(_Frame(None, ""))
        frames[-1].code.append(code[:400])
    return frames
