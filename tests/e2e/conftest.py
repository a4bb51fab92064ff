"""The real dashboard in a real browser: a `streamlit run` server on a free port and headless Debian Chromium.

Playwright drives the Chromium that Debian installs (`/usr/bin/chromium`): it never downloads a
browser of its own (`playwright install` is never run), so this works on a machine with no network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from db import open_engine
from db.queries import list_runs
from tests.conftest import REPO, subprocess_env

CHROMIUM = Path("/usr/bin/chromium")
# --no-sandbox: CI runs as root; the background-networking flags keep Chromium from dialling out on a
# closed network (each refused connection costs time at start).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SERVER_START_TIMEOUT_S = 90.0
_LOG_TAIL_CHARS = 6000


@dataclass(frozen=True)
class Server:
    url: str
    db_url: str
    log_path: Path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the test, so fixtures can tell at teardown whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError:
        return ""


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with code {process.returncode} before serving:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"streamlit did not answer /_stcore/health within {SERVER_START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")


def _stop_trainers(db_url: str) -> None:
    """SIGTERM any trainer the browser started that still runs: a failed test must not leave one training."""
    engine = open_engine(db_url)
    try:
        running = [run for run in list_runs(engine) if run.status == "running" and run.pid]
    finally:
        engine.dispose()
    for run in running:
        try:
            command = psutil.Process(run.pid).cmdline()
        except psutil.Error:
            continue
        if "_worker" in command and str(run.id) in command:
            os.kill(run.pid, signal.SIGTERM)


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """`streamlit run app/main.py` as the README starts it, on a free port, over a database of its own."""
    port = _free_port()
    url, db_url = f"http://127.0.0.1:{port}", f"sqlite:///{tmp_path / 'runs.db'}"
    env = {
        **subprocess_env(),
        "OOMLENS_WORKSPACE": str(tmp_path / "workspace"),
        "OOMLENS_DB_URL": db_url,
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    log_path = tmp_path / "streamlit.log"
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "app/main.py",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_healthy(url, process, log_path)
        yield Server(url, db_url, log_path)
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(f"streamlit's log ({log_path}), last part:\n{_tail(log_path)}")
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _stop_trainers(db_url)


@pytest.fixture
def page(request: pytest.FixtureRequest, tmp_path: Path):
    """A page in headless Chromium; on a failure its screenshot is left in the test's tmp dir."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS))
        # Tall, so a full-page screenshot of a failure shows most of a Streamlit page (its main area scrolls).
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.set_default_timeout(30_000)
        try:
            yield page
        finally:
            report = getattr(request.node, "report_call", None)
            if report is None or report.failed:
                shot = tmp_path / "failure.png"
                try:
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"screenshot of the failure: {shot}")
                except Exception as error:  # noqa: BLE001 - a failed screenshot must not hide the test's own failure
                    print(f"no screenshot ({error})")
            browser.close()
