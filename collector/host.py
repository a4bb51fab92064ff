"""Host readings of the trainer process: resident memory, its peak, and CPU use.

A CPU run's out-of-memory is a host OOM, and a GPU run can still die of the host (pinned buffers,
data loaders), so RSS is recorded next to the device figures.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from collector.readings import HostReading

log = logging.getLogger(__name__)

BYTES_PER_KIB = 1024
# psutil's cpu_percent costs ~70 µs, a quarter of the collector's per-step host cost: read it every
# Nth sample. Non-blocking cpu_percent averages over the time since the previous read, so the
# value carried between reads is that window's average, not a stale instant.
CPU_PERCENT_EVERY = 10


class _StatmRss:
    """RSS from /proc/self/statm through a descriptor kept open: ~3 µs a read where psutil's
    memory_info, which opens and parses the same file each time, costs ~25 µs. Linux only;
    `open()` returns None elsewhere and psutil is used."""

    def __init__(self, fd: int):
        self._fd = fd
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def open(cls) -> _StatmRss | None:
        try:
            return cls(os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except (OSError, AttributeError, ValueError):
            return None

    def read(self) -> int:
        # statm: size resident shared text lib data dt, in pages (proc(5)).
        return int(os.pread(self._fd, 256, 0).split()[1]) * self._page_size

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def _peak_rss_bytes() -> int:
    import resource  # POSIX only: imported here so a Windows run loses one field, not the probe

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS (getrusage(2) on each).
    return int(peak) if sys.platform == "darwin" else int(peak) * BYTES_PER_KIB


class HostProbe:
    """Reads this process as the OS sees it; a field that cannot be read is None, logged once."""

    def __init__(self) -> None:
        self._logged_fields: set[str] = set()
        self._samples = 0
        self._cpu_percent: float | None = None
        self._process: psutil.Process | None = self._read("process", psutil.Process)
        self._statm = _StatmRss.open()
        # psutil's first non-blocking cpu_percent() is a meaningless 0.0 that only sets the
        # baseline; take it now so the first sample covers the time since construction.
        if self._process is not None:
            self._read("cpu_percent", self._process.cpu_percent, None)

    def sample(self) -> HostReading:
        taken_at = time.time()
        rss = None
        if self._process is not None:
            rss = self._read("rss", self._rss)
            if self._samples % CPU_PERCENT_EVERY == 0:
                cpu = self._read("cpu_percent", self._process.cpu_percent, None)
                self._cpu_percent = None if cpu is None else float(cpu)
        self._samples += 1
        return HostReading(
            taken_at=taken_at,
            rss_bytes=rss,
            peak_rss_bytes=self._read("peak_rss", _peak_rss_bytes),
            cpu_percent=self._cpu_percent,
        )

    def _rss(self) -> int:
        if self._statm is not None:
            return self._statm.read()
        return int(self._process.memory_info().rss)  # type: ignore[union-attr]  # checked by sample()

    def close(self) -> None:
        if self._statm is not None:
            self._statm.close()
            self._statm = None

    def _read(self, field: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - one field failing must not lose the others
            if field not in self._logged_fields:
                self._logged_fields.add(field)
                log.warning("cannot read host %s (%s: %s); recording it as missing", field, type(exc).__name__, exc)
            return None
