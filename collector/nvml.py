"""GPU readings from NVML: the one module that touches `pynvml` (package `nvidia-ml-py`).

NVML sees what the allocator cannot: memory held by the CUDA context and by other processes,
utilisation, temperature, power. Calls hold the driver lock, and their costs differ by three
orders of magnitude (REFERENCE §3: memory info ~12 µs, utilisation ~3 µs, running-process list
~4.5 ms), so memory and utilisation are sampled at ~1 Hz and the process list rarely.

`pynvml` is imported inside `open_nvml` so that importing this module never fails on a machine
without the package or the driver; such a machine gets `NvmlUnavailable` with a reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector.readings import DeviceReading

log = logging.getLogger(__name__)

MILLIWATTS_PER_WATT = 1000.0
DEFAULT_PROCESS_INTERVAL_S = 10.0


@dataclass(frozen=True)
class NvmlUnavailable:
    """Why GPU readings are left out of this run, in words a user can act on."""

    reason: str


def open_nvml(
    gpu_index: int,
    *,
    process_interval_s: float = DEFAULT_PROCESS_INTERVAL_S,
    nvml: Any | None = None,
) -> NvmlProbe | NvmlUnavailable:
    """Start NVML for one GPU, or say why not; never raises, because GPU readings are optional.

    `gpu_index` is NVML's index, which is not torch's `cuda:N` when CUDA_VISIBLE_DEVICES or
    CUDA_DEVICE_ORDER reorder devices. `nvml` replaces the `pynvml` module (tests).
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return _unavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any failure means "no GPU readings", never a crash
        return _unavailable(_init_failure_reason(nvml, exc))
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(gpu_index)
    except Exception as exc:  # noqa: BLE001
        reason = _handle_failure_reason(nvml, gpu_index, exc)
        _shutdown_quietly(nvml)
        return _unavailable(reason)
    log.debug("NVML opened for GPU %d", gpu_index)
    return NvmlProbe(nvml, handle, gpu_index, process_interval_s=process_interval_s)


def _unavailable(reason: str) -> NvmlUnavailable:
    log.info("GPU readings from NVML are off: %s", reason)
    return NvmlUnavailable(reason)


def _is(nvml: Any, exc: BaseException, class_name: str) -> bool:
    cls = getattr(nvml, class_name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


def _init_failure_reason(nvml: Any, exc: BaseException) -> str:
    if _is(nvml, exc, "NVMLError_LibraryNotFound"):
        return "NVML library not found (no NVIDIA driver)"
    if _is(nvml, exc, "NVMLError_DriverNotLoaded"):
        return "NVIDIA driver not loaded (check `nvidia-smi`)"
    if _is(nvml, exc, "NVMLError_NoPermission"):
        return "no permission to query NVML"
    return f"NVML failed to start: {type(exc).__name__}: {exc}"


def _handle_failure_reason(nvml: Any, gpu_index: int, exc: BaseException) -> str:
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - the count only decorates the message
        count = None
    if count is not None and not 0 <= gpu_index < count:
        return f"no GPU at NVML index {gpu_index} (NVML sees {count})"
    return f"cannot open GPU {gpu_index} in NVML: {type(exc).__name__}: {exc}"


def _shutdown_quietly(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - shutting down is best effort
        log.debug("nvmlShutdown failed: %s", exc)


class NvmlProbe:
    """Reads one GPU in one pass; a field NVML refuses reads None and is logged once.

    Not thread-safe: one sampler thread owns it.
    """

    def __init__(
        self,
        nvml: Any,
        handle: Any,
        gpu_index: int,
        *,
        process_interval_s: float = DEFAULT_PROCESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self._handle = handle
        self.gpu_index = gpu_index
        self._process_interval_s = process_interval_s
        self._clock = clock
        self._pid = os.getpid()
        self._logged_fields: set[str] = set()
        self._process_used_bytes: int | None = None
        self._process_queried_at: float | None = None
        self._closed = False

    def sample(self) -> DeviceReading:
        taken_at = time.time()
        memory = self._read("memory", self._nvml.nvmlDeviceGetMemoryInfo, self._handle)
        util = self._read("utilization", self._nvml.nvmlDeviceGetUtilizationRates, self._handle)
        temperature = self._read(
            "temperature", self._nvml.nvmlDeviceGetTemperature, self._handle, self._nvml.NVML_TEMPERATURE_GPU
        )
        power_mw = self._read("power", self._nvml.nvmlDeviceGetPowerUsage, self._handle)
        return DeviceReading(
            taken_at=taken_at,
            gpu_index=self.gpu_index,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            gpu_util_percent=None if util is None else float(util.gpu),
            memory_util_percent=None if util is None else float(util.memory),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / MILLIWATTS_PER_WATT,
            process_used_bytes=self._process_bytes(),
        )

    def close(self) -> None:
        """Balance this probe's nvmlInit (NVML counts them); idempotent."""
        if not self._closed:
            self._closed = True
            _shutdown_quietly(self._nvml)

    def _process_bytes(self) -> int | None:
        # The process list costs ~4.5 ms under the driver lock: refresh it rarely, reuse between.
        now = self._clock()
        if self._process_queried_at is not None and now - self._process_queried_at < self._process_interval_s:
            return self._process_used_bytes
        self._process_queried_at = now
        processes = self._read("process memory", self._nvml.nvmlDeviceGetComputeRunningProcesses, self._handle)
        if processes is None:
            self._process_used_bytes = None
            return None
        # usedGpuMemory is None where the driver cannot attribute memory (WDDM, some containers);
        # inside a PID namespace NVML lists host pids, so this process may not be found at all.
        mine = [p.usedGpuMemory for p in processes if p.pid == self._pid]
        if not mine or any(used is None for used in mine):
            self._process_used_bytes = None
        else:
            self._process_used_bytes = int(sum(mine))
        return self._process_used_bytes

    def _read(self, field: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - one field failing must not lose the others
            if field not in self._logged_fields:
                self._logged_fields.add(field)
                level = logging.INFO if _is(self._nvml, exc, "NVMLError_NotSupported") else logging.WARNING
                log.log(
                    level,
                    "GPU %d: NVML cannot read %s (%s); recording it as missing",
                    self.gpu_index,
                    field,
                    str(exc) or type(exc).__name__,
                )
            return None


class NvmlSampler:
    """Samples a probe on a wall-clock schedule in a daemon thread, independent of training steps."""

    def __init__(
        self,
        probe: NvmlProbe,
        publish: Callable[[DeviceReading], None],
        *,
        interval_s: float = 1.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._probe = probe
        self._publish = publish
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oomlens-nvml", daemon=True)
        self._logged_errors: set[type[BaseException]] = set()
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling and release NVML; idempotent, returns within about `timeout`."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Shutting NVML down under a call still in flight is undefined; leave it to process exit.
            log.warning("NVML sampler did not stop within %.1f s; leaving NVML open", timeout)
            return
        self._probe.close()

    def sample_now(self) -> DeviceReading | None:
        """One reading taken now, off the schedule (an OOM post-mortem wants the device as the
        failure left it, not as it was up to a second before). NVML's calls are thread-safe, so
        this may run beside the sampling thread. None if NVML is stopped or the read fails."""
        if self._stopped:
            return None
        try:
            return self._probe.sample()
        except Exception as exc:  # noqa: BLE001 - a post-mortem goes on without it
            log.warning("NVML reading at the failure failed: %s: %s", type(exc).__name__, exc)
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._sample_once()
            # Waiting on the event (not sleep) makes stop() prompt and skips the final partial wait.
            if self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started))):
                return

    def _sample_once(self) -> None:
        try:
            self._publish(self._probe.sample())
        except Exception as exc:  # noqa: BLE001 - the sampler must never take training down
            if type(exc) not in self._logged_errors:
                self._logged_errors.add(type(exc))
                log.warning("NVML sample skipped: %s: %s", type(exc).__name__, exc, exc_info=True)
