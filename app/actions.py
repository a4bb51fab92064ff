"""What the dashboard changes: deleting a run, stopping one. Each returns a message for the page."""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from app import data
from app.views.status import is_live
from db.queries import RunRecord, get_postmortem
from db.writes import delete_run as delete_run_rows


@dataclass(frozen=True)
class Outcome:
    done: bool
    message: str


def delete_run(url: str, run: RunRecord, now: float) -> Outcome:
    """Delete a finished run with its samples, post-mortem, layer profiles and allocator snapshot."""
    if is_live(run, now):
        return Outcome(False, f"Run {run.id} is still running: stop it first, then delete it.")
    engine = data.engine(url)
    postmortem = get_postmortem(engine, run.id)
    deleted = delete_run_rows(engine, run.id)
    data.forget()
    if not deleted:
        return Outcome(False, f"Run {run.id} was already deleted.")
    if postmortem is not None and postmortem.snapshot_path:
        _remove_snapshot(Path(postmortem.snapshot_path), run.id)
    return Outcome(True, f"Run {run.id} deleted.")


def _remove_snapshot(path: Path, run_id: int) -> None:
    # Only a file in the run's own folder (…/snapshots/run-<id>/, trainer.worker), never a path that
    # merely came from the database.
    folder = path.parent
    if folder.name != f"run-{run_id}" or folder.parent.name != "snapshots":
        return
    path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: something else lives there


def stop_run(run: RunRecord, now: float) -> Outcome:
    """Ask a running trainer to stop: SIGTERM to its worker, which flushes its samples and ends as stopped.

    The worker's pid is on the run row (the launcher forwards a SIGTERM to the same process). It is
    signalled only if it is on this host and still is this run's worker, so a reused pid is never hit.
    """
    if not is_live(run, now):
        return Outcome(False, f"Run {run.id} is not running.")
    if run.pid is None:
        return Outcome(False, f"Run {run.id} has not reported its process yet (still starting): try again in a moment.")
    here = socket.gethostname()
    if run.host and run.host != here:
        return Outcome(False, f"Run {run.id} trains on {run.host}, not on this host ({here}): stop it there.")
    try:
        process = psutil.Process(run.pid)
        if not _is_worker_of(process.cmdline(), run.id):
            return Outcome(False, f"Process {run.pid} is no longer run {run.id}'s trainer: nothing was sent.")
        process.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        return Outcome(False, f"Run {run.id}'s trainer (process {run.pid}) has already exited.")
    except psutil.AccessDenied:
        return Outcome(False, f"Not allowed to signal process {run.pid}: stop run {run.id} as the user who started it.")
    data.forget()
    return Outcome(True, f"Stop requested: run {run.id} saves what it measured and ends as stopped.")


def _is_worker_of(cmdline: list[str], run_id: int) -> bool:
    # trainer.launcher.worker_command: python -m trainer _worker --run-id N --db URL
    if "_worker" not in cmdline or "--run-id" not in cmdline:
        return False
    position = cmdline.index("--run-id") + 1
    return position < len(cmdline) and cmdline[position] == str(run_id)
