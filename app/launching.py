"""Starting trainers from the dashboard: the config saved in the workspace, then the CLI as a process of its own.

The dashboard runs exactly what a user would type (`python -m trainer run --config FILE --db URL`),
so a run launched here is recorded, refused or killed the same way as one started in a terminal.
The process gets a session of its own: a Streamlit rerun, a closed browser tab or a restarted
server never takes the training down with it.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import make_url

from app.views.dotted import yaml_value
from db.engine import workspace_dir
from db.queries import RunRecord
from trainer.config import ConfigError, RunConfig, apply_overrides, runner_issues, validate_config

REPO = Path(__file__).resolve().parent.parent
# The launcher prints the run id once the config is checked and the run row written: a second or
# two, more while another process holds the SQLite write lock.
FIRST_LINE_TIMEOUT_S = 60.0
_LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Started:
    """What became of a launch: the new run's id, or why there is none."""

    run_id: int | None
    message: str
    config_path: Path | None = None
    log_path: Path | None = None


def launches_dir() -> Path:
    folder = workspace_dir() / "launches"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def trainer_command(
    config_path: Path, db_url: str, *, name: str | None = None, parent_run_id: int | None = None
) -> list[str]:
    command = [sys.executable, "-m", "trainer", "run", "--config", str(config_path), "--db", db_url]
    if name:
        command += ["--name", name]
    if parent_run_id is not None:
        command += ["--parent", str(parent_run_id)]
    return command


def refusal(cfg: RunConfig) -> str | None:
    """Why the runner would refuse this config on this machine, or None."""
    issues = runner_issues(cfg)
    if not issues:
        return None
    return "The runner cannot train this config here: " + "; ".join(str(issue) for issue in issues) + "."


def start_run(
    cfg: RunConfig,
    db_url: str,
    *,
    name: str | None = None,
    parent_run_id: int | None = None,
    timeout_s: float = FIRST_LINE_TIMEOUT_S,
) -> Started:
    """Write the config into the workspace, start the trainer, and wait only for its run id."""
    refused = refusal(cfg)
    if refused:
        return Started(None, refused)
    config_path, log_path = _new_files(name or cfg.model.name)
    command = trainer_command(config_path, db_url, name=name, parent_run_id=parent_run_id)
    shown = trainer_command(config_path, _printable(db_url), name=name, parent_run_id=parent_run_id)
    config_path.write_text(_header(shown) + cfg.to_yaml())
    env = dict(os.environ)
    # `-m trainer` must resolve wherever the dashboard was started; the working directory stays the
    # dashboard's, so relative data and model paths mean what they meant when the form checked them.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    with log_path.open("ab") as log:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        except OSError as error:
            return Started(None, f"Could not start the trainer ({error}).", config_path, log_path)
    line = _first_line(process, log_path, timeout_s)
    if line is None:
        return _no_run_id(process, config_path, log_path, timeout_s)
    if not re.fullmatch(r"\d+", line.strip()):
        return Started(
            None,
            f"The trainer printed {line.strip()!r} where its run id belongs; its log is `{log_path}`.",
            config_path,
            log_path,
        )
    run_id = int(line)
    return Started(run_id, f"Run {run_id} started (config `{config_path}`).", config_path, log_path)


def patched_config(config: Mapping[str, Any], patch: Mapping[str, Any]) -> RunConfig:
    """A stored run config with a suggestion's patch applied, validated; ConfigError lists every problem."""
    overrides = [f"{key}={yaml_value(value)}" for key, value in patch.items()]
    return validate_config(apply_overrides(dict(config), overrides))


def relaunch(run: RunRecord, patch: Mapping[str, Any], change: str, db_url: str) -> Started:
    """Run `run` again with one fix applied, recorded as its child so Compare can put them side by side."""
    try:
        cfg = patched_config(run.config, patch)
    except ConfigError as error:
        problems = "; ".join(str(issue) for issue in error.issues)
        return Started(None, f"Run {run.id}'s config with `{change}` is not valid: {problems}.")
    return start_run(cfg, db_url, name=f"fix: {change}", parent_run_id=run.id)


_COUNTER = itertools.count()


def _new_files(label: str) -> tuple[Path, Path]:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(label).name).strip("-.")[:40] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = launches_dir()
    while True:
        stem = f"{stamp}-{os.getpid()}-{next(_COUNTER)}-{slug}"
        try:
            # "x": never overwrite the config of an earlier launch (two clicks in one second).
            (folder / f"{stem}.yaml").open("x").close()
        except FileExistsError:
            continue
        return folder / f"{stem}.yaml", folder / f"{stem}.log"


def _printable(db_url: str) -> str:
    # The URL may carry a password; the saved file never does.
    return make_url(db_url).render_as_string(hide_password=True)


def _header(command: list[str]) -> str:
    return (
        f"# Launched from the oomlens dashboard on {time.strftime('%Y-%m-%d %H:%M:%S')}:\n"
        f"#   python {shlex.join(command[1:])}\n"
    )


def _first_line(process: subprocess.Popen, log_path: Path, timeout_s: float) -> str | None:
    """The launcher's first stdout line (the run id), or None at end of output or after the timeout.

    A daemon thread reads it, then copies whatever else appears to the log (nothing, normally) so the
    launcher never blocks on a full pipe, and reaps the launcher when it exits.
    """
    lines: queue.Queue[str | None] = queue.Queue(maxsize=1)

    def read(stdout: IO[bytes]) -> None:
        first = stdout.readline()
        lines.put(first.decode(errors="replace") if first else None)
        with log_path.open("ab") as log:
            for rest in stdout:
                log.write(rest)
        stdout.close()
        process.wait()

    threading.Thread(target=read, args=(process.stdout,), name=f"oomlens-launch-{process.pid}", daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        return None


def _no_run_id(process: subprocess.Popen, config_path: Path, log_path: Path, timeout_s: float) -> Started:
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        # Still starting after the timeout: stop it rather than leave a trainer nobody can see.
        os.killpg(process.pid, signal.SIGTERM)
        return Started(
            None,
            f"The trainer did not report a run id within {timeout_s:g} s and was stopped. Its log: `{log_path}`.",
            config_path,
            log_path,
        )
    tail = _tail(log_path)
    reason = "refused the config" if code == 2 else f"exited with code {code} before starting a run"
    return Started(
        None,
        f"The trainer {reason}:\n\n```\n{tail}\n```" if tail else f"The trainer {reason} (log `{log_path}`).",
        config_path,
        log_path,
    )


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-_LOG_TAIL_CHARS:].strip()
