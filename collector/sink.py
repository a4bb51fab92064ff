"""A bounded queue and one writer thread between the training loop and the database.

The training step must never wait on the database: `put` never blocks, and when the writer
falls behind far enough to fill the queue, records are dropped and counted rather than stalling
training. Writes are batched because one transaction per batch costs about what one per record
does. On close everything already accepted is written, so the records of a run that ends in an
OOM (the ones that matter most) reach the database.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)

# Tells the writer that close() was called; a sentinel wakes it at once instead of after a timeout.
_CLOSE = object()
# How long the writer waits for a first record when there is no heartbeat to keep.
_MAX_IDLE_WAIT_S = 1.0


class RecordSink:
    """Accepts records from any thread and writes them in batches from one daemon thread."""

    def __init__(
        self,
        write_batch: Callable[[list[object]], None],
        *,
        max_queue: int = 10_000,
        max_batch: int = 500,
        flush_interval_s: float = 0.5,
        on_idle: Callable[[], None] | None = None,
        idle_interval_s: float = 5.0,
        on_drop: Callable[[int], None] | None = None,
        max_attempts: int = 3,
    ) -> None:
        errors = []
        if max_queue < 1:
            errors.append(f"max_queue must be >= 1, got {max_queue}")
        if max_batch < 1:
            errors.append(f"max_batch must be >= 1, got {max_batch}")
        if flush_interval_s <= 0:
            errors.append(f"flush_interval_s must be > 0, got {flush_interval_s}")
        if idle_interval_s <= 0:
            errors.append(f"idle_interval_s must be > 0, got {idle_interval_s}")
        if max_attempts < 1:
            errors.append(f"max_attempts must be >= 1, got {max_attempts}")
        if errors:
            raise ValueError("; ".join(errors))
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._flush_interval_s = flush_interval_s
        self._on_idle = on_idle
        self._idle_interval_s = idle_interval_s
        self._on_drop = on_drop
        self._max_attempts = max_attempts
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        # Reentrant: a signal handler runs on the main thread and may call put() or close()
        # while the main thread is already inside one of them.
        self._lock = threading.RLock()
        self._closing = False
        self._closing_event = threading.Event()
        self._drop_reported = False
        self._dropped = 0
        self._warned_full = False
        self._warned_closed = False
        self._logged_write_errors: set[type[BaseException]] = set()
        self._logged_idle_errors: set[type[BaseException]] = set()
        self._warned_write_drop = False
        self._close_queued = False
        self._in_flight = 0  # records the writer holds, for the loss estimate if close times out
        self._thread = threading.Thread(target=self._run, name="oomlens-sink", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records accepted by nobody: queue full, put after close, or writes that kept failing."""
        with self._lock:
            return self._dropped

    def put(self, record: object) -> bool:
        """Enqueue a record without ever blocking; False if it was dropped."""
        with self._lock:
            if self._closing:
                self._dropped += 1
                if not self._warned_closed:
                    self._warned_closed = True
                    log.warning("record sink is closed; dropping records put after close")
                return False
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._dropped += 1
                if not self._warned_full:
                    self._warned_full = True
                    log.warning(
                        "record queue full (%d): the database is slower than training; dropping records",
                        self._queue.maxsize,
                    )
                return False
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, write everything already accepted, and join the writer.

        Idempotent and safe from a `finally` or a signal-driven shutdown; never raises.
        """
        with self._lock:
            if not self._closing:
                self._closing = True
                self._closing_event.set()
                try:
                    self._queue.put_nowait(_CLOSE)
                    self._close_queued = True
                except queue.Full:
                    pass  # the writer is busy draining and sees the flag once the queue empties
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        unwritten = 0
        if self._thread.is_alive():
            unwritten = self._queue.qsize() - int(self._close_queued) + self._in_flight
            log.warning(
                "record sink did not finish within %.1f s; about %d records were not written", timeout, unwritten
            )
        with self._lock:
            if self._drop_reported:
                return
            self._drop_reported = True
            lost = self._dropped + unwritten
        if lost:
            log.warning("record sink lost %d records in this run", lost)
            if self._on_drop is not None:
                try:
                    self._on_drop(lost)
                except Exception as exc:  # noqa: BLE001 - reporting a loss must not cause another
                    log.warning("on_drop failed: %s: %s", type(exc).__name__, exc)

    def __enter__(self) -> RecordSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        last_idle = time.monotonic()
        draining = False
        while True:
            batch, saw_close = self._collect(draining, last_idle)
            draining = draining or saw_close or self._closing
            if batch:
                self._write_with_retries(batch, draining)
            if self._on_idle is not None and time.monotonic() - last_idle >= self._idle_interval_s:
                last_idle = time.monotonic()
                self._call_on_idle()
            if draining and not batch and self._queue.empty():
                return

    def _collect(self, draining: bool, last_idle: float) -> tuple[list[object], bool]:
        """Wait for a first record, then gather more until the batch is full or flush time is up."""
        batch: list[object] = []
        first_deadline = last_idle + self._idle_interval_s if self._on_idle is not None else None
        flush_deadline: float | None = None
        while len(batch) < self._max_batch:
            if draining or self._closing:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return batch, True
            else:
                now = time.monotonic()
                if flush_deadline is not None:
                    wait = flush_deadline - now
                elif first_deadline is not None:
                    wait = min(first_deadline - now, _MAX_IDLE_WAIT_S)
                else:
                    wait = _MAX_IDLE_WAIT_S
                if wait <= 0:
                    return batch, False
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    continue  # the next pass sees a deadline passed, or the close flag
            if item is _CLOSE:
                draining = True
                continue
            batch.append(item)
            if flush_deadline is None:
                flush_deadline = time.monotonic() + self._flush_interval_s
        return batch, draining

    def _write_with_retries(self, batch: list[object], draining: bool) -> None:
        self._in_flight = len(batch)
        try:
            self._attempt_writes(batch, draining)
        finally:
            self._in_flight = 0

    def _attempt_writes(self, batch: list[object], draining: bool) -> None:
        for attempt in range(1, self._max_attempts + 1):
            try:
                self._write_batch(list(batch))
                return
            except Exception as exc:  # noqa: BLE001 - a failed write must never reach training
                if type(exc) not in self._logged_write_errors:
                    self._logged_write_errors.add(type(exc))
                    log.warning(
                        "writing %d records failed (attempt %d of %d): %s: %s",
                        len(batch),
                        attempt,
                        self._max_attempts,
                        type(exc).__name__,
                        exc,
                        exc_info=True,
                    )
            if attempt < self._max_attempts and not (draining or self._closing):
                # Give a busy database a moment; close() cuts the wait short.
                self._closing_event.wait(self._flush_interval_s)
        with self._lock:
            self._dropped += len(batch)
        if not self._warned_write_drop:
            self._warned_write_drop = True
            log.warning(
                "dropped %d records after %d failed writes; later losses are counted and reported at close",
                len(batch),
                self._max_attempts,
            )

    def _call_on_idle(self) -> None:
        try:
            self._on_idle()  # type: ignore[misc]  # checked by the caller
        except Exception as exc:  # noqa: BLE001 - a failed heartbeat must not stop the writer
            if type(exc) not in self._logged_idle_errors:
                self._logged_idle_errors.add(type(exc))
                log.warning("on_idle failed: %s: %s", type(exc).__name__, exc, exc_info=True)
